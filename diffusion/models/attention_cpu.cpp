// Exact softmax attention for fp32 on the CPU, forward and backward, for the narrow heads (8-32 wide)
// of small U-Nets, where PyTorch's flash kernel spends its time in thousands of tiny GEMM calls.
//
// Each (batch, head) pair is one task, run start to end by one thread: results do not depend on the
// number of threads, and the backward pass accumulates dK and dV without atomics. Within a task the
// keys and values are transposed to (D, M) so that every inner loop runs along the M keys, eight at a
// time, whatever the head width D. The score row is kept whole (M floats), so the softmax is the
// two-pass one (max, then exp and sum) and the backward pass recomputes it from the saved logsumexp.
//
// Built by diffusion/models/cpu_attention.py with g++ -O3 -march=native -fopenmp; called through ctypes.

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <omp.h>

namespace {

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
constexpr int W = 8;

inline f8 load(const float* p) { f8 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, f8 v) { std::memcpy(p, &v, sizeof v); }
inline f8 splat(float x) { return f8{x, x, x, x, x, x, x, x}; }
inline float hsum(f8 v) { float s = 0; for (int i = 0; i < W; ++i) s += v[i]; return s; }
inline float hmax(f8 v) { float m = v[0]; for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m; return m; }

// exp(x) for x <= 0, as Cephes' expf computes it: x = n ln2 + r with n = round(x / ln2) and |r| <= ln2/2
// (ln 2 in two parts, so r is exact), a degree-5 minimax polynomial for exp(r), then 2^n put into the
// exponent bits. Adding 1.5 * 2^23 rounds to the nearest integer and leaves n in the low mantissa bits.
// Relative error under 2e-7; exp(x) = 0 below -87.3, where 2^n would leave the normal range.
inline f8 exp8(f8 x) {
    const f8 lo = splat(-87.3365447505f), magic = splat(12582912.0f);
    const i8 under = x < lo;
    x = x < lo ? lo : x;
    const f8 shifted = x * splat(1.44269504088896341f) + magic;
    const f8 n = shifted - magic;
    x = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    f8 y = splat(1.9875691500e-4f);
    y = y * x + splat(1.3981999507e-3f);
    y = y * x + splat(8.3334519073e-3f);
    y = y * x + splat(4.1665795894e-2f);
    y = y * x + splat(1.6666665459e-1f);
    y = y * x + splat(5.0000001201e-1f);
    y = y * x * x + x + splat(1.0f);
    i8 bits;
    std::memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - 0x4B400000 + 127) << 23;  // 0x4B400000: the bits of 1.5 * 2^23
    f8 pow2;
    std::memcpy(&pow2, &bits, sizeof pow2);
    const f8 r = y * pow2;
    return under ? splat(0.0f) : r;
}

struct Strides { int64_t b, n, h; };  // element strides of a (B, N, H, D) tensor whose D stride is 1

inline const float* row(const float* base, Strides s, int b, int h, int i) { return base + b * s.b + h * s.h + i * s.n; }
inline float* row(float* base, Strides s, int b, int h, int i) { return base + b * s.b + h * s.h + i * s.n; }

// (M, D) rows of one head -> (D, Mp) columns, zero-padded from M to Mp.
void transpose_in(const float* src, Strides s, int b, int h, int M, int D, int Mp, float* dst) {
    std::memset(dst, 0, sizeof(float) * D * Mp);
    for (int j = 0; j < M; ++j) {
        const float* r = row(src, s, b, h, j);
        for (int c = 0; c < D; ++c) dst[c * Mp + j] = r[c];
    }
}

// (M, D) rows of one head -> contiguous (M, D) rows.
void gather_rows(const float* src, Strides s, int b, int h, int M, int D, float* dst) {
    for (int j = 0; j < M; ++j) std::memcpy(dst + (size_t)j * D, row(src, s, b, h, j), sizeof(float) * D);
}

float* alloc(size_t n) {
    void* p = nullptr;
    if (posix_memalign(&p, 64, sizeof(float) * (n ? n : 1))) return nullptr;
    return static_cast<float*>(p);
}

// s_r[j] = scale * q_r . k_j for R query rows at once (each key column is loaded once for all R), and
// -inf on the padding from M to Mp.
template <int R>
inline void scores(const float* const* q, const float* Kt, int D, int M, int Mp, float scale, float* const* s) {
    for (int j = 0; j < Mp; j += W) {
        f8 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = splat(0.0f);
        for (int c = 0; c < D; ++c) {
            const f8 kc = load(Kt + c * Mp + j);
            for (int r = 0; r < R; ++r) acc[r] += splat(q[r][c]) * kc;
        }
        for (int r = 0; r < R; ++r) store(s[r] + j, acc[r] * splat(scale));
    }
    for (int r = 0; r < R; ++r)
        for (int j = M; j < Mp; ++j) s[r][j] = -INFINITY;
}

// acc[r] = sum over j < M of w[r][j] * X[j], for R weight rows at once over the contiguous rows X[j]
// of D = 8 DV floats, each loaded once for all R: P V in the forward pass, dS K in the backward.
template <int R, int DV>
inline void weighted_rows(const float* const* w, const float* X, int M, f8 (&acc)[R][DV]) {
    constexpr int D = DV * W;
    for (int r = 0; r < R; ++r)
        for (int d = 0; d < DV; ++d) acc[r][d] = splat(0.0f);
    for (int j = 0; j < M; ++j) {
        f8 xj[DV];
        for (int d = 0; d < DV; ++d) xj[d] = load(X + (size_t)j * D + d * W);
        for (int r = 0; r < R; ++r) {
            const f8 wj = splat(w[r][j]);
            for (int d = 0; d < DV; ++d) acc[r][d] += wj * xj[d];
        }
    }
}

// Forward for R query rows starting at i: softmax of the scores, then the probabilities times the
// value rows, DV vectors of 8 per row (D = 8 DV).
template <int R, int DV>
void forward_rows(const float* q, Strides sq, float* out, Strides so, float* lse, int b, int h, int i,
                  const float* Kt, const float* Vr, int M, int Mp, float scale, float* buf) {
    constexpr int D = DV * W;
    const float* qr[R];
    float* s[R];
    for (int r = 0; r < R; ++r) { qr[r] = row(q, sq, b, h, i + r); s[r] = buf + (size_t)r * Mp; }
    scores<R>(qr, Kt, D, M, Mp, scale, s);
    // The R rows' softmaxes side by side: each exp is a long chain of dependent operations, and R
    // independent ones per step keep the vector units busy. Each row's arithmetic is as if alone.
    f8 vmax[R], vsum[R], m[R];
    for (int r = 0; r < R; ++r) vmax[r] = splat(-INFINITY);
    for (int j = 0; j < Mp; j += W)
        for (int r = 0; r < R; ++r) { f8 x = load(s[r] + j); vmax[r] = x > vmax[r] ? x : vmax[r]; }
    for (int r = 0; r < R; ++r) { m[r] = splat(hmax(vmax[r])); vsum[r] = splat(0.0f); }
    for (int j = 0; j < Mp; j += W)
        for (int r = 0; r < R; ++r) {
            f8 p = exp8(load(s[r] + j) - m[r]);
            store(s[r] + j, p);
            vsum[r] += p;
        }
    float l[R];
    for (int r = 0; r < R; ++r) {
        l[r] = hsum(vsum[r]);
        lse[i + r] = m[r][0] + std::log(l[r]);
    }
    f8 acc[R][DV];
    weighted_rows<R, DV>(s, Vr, M, acc);
    for (int r = 0; r < R; ++r) {
        float* o = row(out, so, b, h, i + r);
        for (int d = 0; d < DV; ++d) store(o + d * W, acc[r][d] / splat(l[r]));
    }
}

// Backward for R query rows starting at i: recompute the probabilities from lse, then
// dS = P (dO Vᵀ - rowsum(dO O)) scale; dQ = dS K; dK += dSᵀ Q; dV += Pᵀ dO.
template <int R, int DV>
void backward_rows(const float* q, Strides sq, const float* out, Strides so, const float* dout, Strides sg,
                   const float* lse, float* dq, Strides sdq, int b, int h, int i, const float* Kt, const float* Vt,
                   const float* Kr, float* dKt, float* dVt, int M, int Mp, float scale, float* buf) {
    constexpr int D = DV * W;
    const float *qr[R], *gr[R];
    float *p[R], *ds[R];
    float delta[R];  // rowsum(dO * O): the softmax Jacobian's correction term
    for (int r = 0; r < R; ++r) {
        qr[r] = row(q, sq, b, h, i + r);
        gr[r] = row(dout, sg, b, h, i + r);
        const float* o = row(out, so, b, h, i + r);
        p[r] = buf + (size_t)(2 * r) * Mp;
        ds[r] = buf + (size_t)(2 * r + 1) * Mp;
        delta[r] = 0;
        for (int c = 0; c < D; ++c) delta[r] += gr[r][c] * o[c];
    }
    scores<R>(qr, Kt, D, M, Mp, scale, p);
    for (int j = 0; j < Mp; j += W) {
        f8 dp[R];
        for (int r = 0; r < R; ++r) dp[r] = splat(0.0f);
        for (int c = 0; c < D; ++c) {
            const f8 vc = load(Vt + c * Mp + j);
            for (int r = 0; r < R; ++r) dp[r] += splat(gr[r][c]) * vc;
        }
        for (int r = 0; r < R; ++r) {
            const f8 pj = exp8(load(p[r] + j) - splat(lse[i + r]));
            store(p[r] + j, pj);
            store(ds[r] + j, pj * (dp[r] - splat(delta[r])) * splat(scale));
        }
    }
    // dK and dV, accumulated along the keys for all R rows at once.
    for (int c = 0; c < D; ++c) {
        float* dk_c = dKt + c * Mp;
        float* dv_c = dVt + c * Mp;
        for (int j = 0; j < Mp; j += W) {
            f8 dk = load(dk_c + j), dv = load(dv_c + j);
            for (int r = 0; r < R; ++r) {
                dk += load(ds[r] + j) * splat(qr[r][c]);
                dv += load(p[r] + j) * splat(gr[r][c]);
            }
            store(dk_c + j, dk);
            store(dv_c + j, dv);
        }
    }
    f8 acc[R][DV];
    weighted_rows<R, DV>(ds, Kr, M, acc);
    for (int r = 0; r < R; ++r) {
        float* dqi = row(dq, sdq, b, h, i + r);
        for (int d = 0; d < DV; ++d) store(dqi + d * W, acc[r][d]);
    }
}

constexpr int ROWS = 4;  // query rows per block: each key and value vector loaded once serves four rows

template <int DV>
void forward_head(const float* q, Strides sq, float* out, Strides so, float* lse, int b, int h, int N,
                  const float* Kt, const float* Vr, int M, int Mp, float scale, float* buf) {
    int i = 0;
    for (; i + ROWS <= N; i += ROWS) forward_rows<ROWS, DV>(q, sq, out, so, lse, b, h, i, Kt, Vr, M, Mp, scale, buf);
    for (; i < N; ++i) forward_rows<1, DV>(q, sq, out, so, lse, b, h, i, Kt, Vr, M, Mp, scale, buf);
}

template <int DV>
void backward_head(const float* q, Strides sq, const float* out, Strides so, const float* dout, Strides sg,
                   const float* lse, float* dq, Strides sdq, int b, int h, int N, const float* Kt, const float* Vt,
                   const float* Kr, float* dKt, float* dVt, int M, int Mp, float scale, float* buf) {
    int i = 0;
    for (; i + ROWS <= N; i += ROWS)
        backward_rows<ROWS, DV>(q, sq, out, so, dout, sg, lse, dq, sdq, b, h, i, Kt, Vt, Kr, dKt, dVt, M, Mp, scale, buf);
    for (; i < N; ++i)
        backward_rows<1, DV>(q, sq, out, so, dout, sg, lse, dq, sdq, b, h, i, Kt, Vt, Kr, dKt, dVt, M, Mp, scale, buf);
}

}  // namespace

extern "C" {

// out (B, N, H, D) and lse (B, H, N, contiguous) from q (B, N, H, D) and k, v (B, M, H, D); D is 8, 16,
// 24 or 32. Returns nonzero if a buffer could not be allocated.
int attention_forward(const float* q, const float* k, const float* v, float* out, float* lse,
                      int B, int H, int N, int M, int D,
                      int64_t qb, int64_t qn, int64_t qh, int64_t kb, int64_t kn, int64_t kh,
                      int64_t vb, int64_t vn, int64_t vh, int64_t ob, int64_t on, int64_t oh,
                      float scale, int threads) {
    if (D % W || D > 4 * W) return 2;
    const Strides sq{qb, qn, qh}, sk{kb, kn, kh}, sv{vb, vn, vh}, so{ob, on, oh};
    const int Mp = (M + W - 1) / W * W;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float* Kt = alloc((size_t)D * Mp);
        float* Vr = alloc((size_t)D * Mp);
        float* buf = alloc((size_t)ROWS * Mp);
        if (!Kt || !Vr || !buf) failed = 1;
#pragma omp for schedule(static)
        for (int task = 0; task < B * H; ++task) {
            if (failed) continue;
            const int b = task / H, h = task % H;
            transpose_in(k, sk, b, h, M, D, Mp, Kt);
            gather_rows(v, sv, b, h, M, D, Vr);
            float* lse_bh = lse + (int64_t)task * N;
            switch (D / W) {
                case 1: forward_head<1>(q, sq, out, so, lse_bh, b, h, N, Kt, Vr, M, Mp, scale, buf); break;
                case 2: forward_head<2>(q, sq, out, so, lse_bh, b, h, N, Kt, Vr, M, Mp, scale, buf); break;
                case 3: forward_head<3>(q, sq, out, so, lse_bh, b, h, N, Kt, Vr, M, Mp, scale, buf); break;
                default: forward_head<4>(q, sq, out, so, lse_bh, b, h, N, Kt, Vr, M, Mp, scale, buf); break;
            }
        }
        std::free(Kt);
        std::free(Vr);
        std::free(buf);
    }
    return failed;
}

// dq (B, N, H, D), dk and dv (B, M, H, D), all contiguous and written whole, from the forward's
// inputs, its out and lse, and dout (B, N, H, D).
int attention_backward(const float* q, const float* k, const float* v, const float* out, const float* dout,
                       const float* lse, float* dq, float* dk, float* dv,
                       int B, int H, int N, int M, int D,
                       int64_t qb, int64_t qn, int64_t qh, int64_t kb, int64_t kn, int64_t kh,
                       int64_t vb, int64_t vn, int64_t vh, int64_t ob, int64_t on, int64_t oh,
                       int64_t gb, int64_t gn, int64_t gh,
                       float scale, int threads) {
    if (D % W || D > 4 * W) return 2;
    const Strides sq{qb, qn, qh}, sk{kb, kn, kh}, sv{vb, vn, vh}, so{ob, on, oh}, sg{gb, gn, gh};
    const Strides sdq{(int64_t)N * H * D, (int64_t)H * D, D}, sdk{(int64_t)M * H * D, (int64_t)H * D, D};
    const int Mp = (M + W - 1) / W * W;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float* Kt = alloc((size_t)D * Mp);
        float* Vt = alloc((size_t)D * Mp);
        float* Kr = alloc((size_t)D * Mp);
        float* dKt = alloc((size_t)D * Mp);
        float* dVt = alloc((size_t)D * Mp);
        float* buf = alloc((size_t)2 * ROWS * Mp);
        if (!Kt || !Vt || !Kr || !dKt || !dVt || !buf) failed = 1;
#pragma omp for schedule(static)
        for (int task = 0; task < B * H; ++task) {
            if (failed) continue;
            const int b = task / H, h = task % H;
            transpose_in(k, sk, b, h, M, D, Mp, Kt);
            transpose_in(v, sv, b, h, M, D, Mp, Vt);
            gather_rows(k, sk, b, h, M, D, Kr);
            std::memset(dKt, 0, sizeof(float) * D * Mp);
            std::memset(dVt, 0, sizeof(float) * D * Mp);
            const float* lse_bh = lse + (int64_t)task * N;
            switch (D / W) {
                case 1: backward_head<1>(q, sq, out, so, dout, sg, lse_bh, dq, sdq, b, h, N, Kt, Vt, Kr, dKt, dVt, M, Mp, scale, buf); break;
                case 2: backward_head<2>(q, sq, out, so, dout, sg, lse_bh, dq, sdq, b, h, N, Kt, Vt, Kr, dKt, dVt, M, Mp, scale, buf); break;
                case 3: backward_head<3>(q, sq, out, so, dout, sg, lse_bh, dq, sdq, b, h, N, Kt, Vt, Kr, dKt, dVt, M, Mp, scale, buf); break;
                default: backward_head<4>(q, sq, out, so, dout, sg, lse_bh, dq, sdq, b, h, N, Kt, Vt, Kr, dKt, dVt, M, Mp, scale, buf); break;
            }
            for (int j = 0; j < M; ++j) {
                float* dkj = row(dk, sdk, b, h, j);
                float* dvj = row(dv, sdk, b, h, j);
                for (int c = 0; c < D; ++c) {
                    dkj[c] = dKt[c * Mp + j];
                    dvj[c] = dVt[c * Mp + j];
                }
            }
        }
        std::free(Kt);
        std::free(Vt);
        std::free(Kr);
        std::free(dKt);
        std::free(dVt);
        std::free(buf);
    }
    return failed;
}

}  // extern "C"
