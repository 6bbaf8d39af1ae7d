// Exact softmax attention for fp32 on the CPU, forward and backward, for the narrow heads (8-32 wide)
// of small U-Nets, where PyTorch's flash kernel spends its time in thousands of tiny GEMM calls.
//
// Each (batch, head) pair is one task, run start to end by one thread: results do not depend on the
// number of threads, and the backward pass accumulates dK and dV without atomics. Threads take tasks
// as they finish (dynamic schedule), so that on a shared machine one descheduled thread does not hold
// up the whole call.
//
// Within a task the keys (and for 8-wide heads the values) are transposed to (D, M) so that the inner
// loops run along the M keys, eight at a time, whatever the head width D. The score row is kept whole (M floats), so the
// softmax is the two-pass one (max, then exp and sum), in base 2 with scale log2(e) folded into q as in
// FlashAttention-2; the backward pass recomputes it from the saved logsumexp.
//
// Built by diffusion/models/cpu_kernels.py with g++ -O3 -march=native -fopenmp; called through ctypes.

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <omp.h>

#include "cpu_vec.h"

namespace {

using namespace kernels;

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

// s_r[j..j + 8U) = q_r . k_j for R query rows and U blocks of 8 keys: each key vector loaded once
// serves all R rows, each broadcast query value all U blocks.
template <int U, int R>
inline void score_blocks(const float* const* q, const float* Kt, int D, int Mp, int j, float* const* s) {
    f8 acc[U][R];
    for (int u = 0; u < U; ++u)
        for (int r = 0; r < R; ++r) acc[u][r] = splat(0.0f);
    for (int c = 0; c < D; ++c) {
        f8 kc[U];
        for (int u = 0; u < U; ++u) kc[u] = load(Kt + c * Mp + j + u * W);
        for (int r = 0; r < R; ++r) {
            const f8 qc = splat(q[r][c]);
            for (int u = 0; u < U; ++u) acc[u][r] += qc * kc[u];
        }
    }
    for (int u = 0; u < U; ++u)
        for (int r = 0; r < R; ++r) store(s[r] + j + u * W, acc[u][r]);
}

// s_r[j] = q_r . k_j for R rows along all keys, and `pad` from M to Mp.
template <int R>
inline void scores(const float* const* q, const float* Kt, int D, int M, int Mp, float* const* s, float pad) {
    constexpr int U = R >= 8 ? 1 : 8 / R;  // 8 independent sums hide the FMA latency
    int j = 0;
    for (; j + U * W <= Mp; j += U * W) score_blocks<U, R>(q, Kt, D, Mp, j, s);
    for (; j < Mp; j += W) score_blocks<1, R>(q, Kt, D, Mp, j, s);
    for (int r = 0; r < R; ++r)
        for (int j = M; j < Mp; ++j) s[r][j] = pad;
}

// part[u][r] += w[r][j + u] * X[j + u] for U keys: each row X[j] (D = 8 DV floats) loaded once for all R.
template <int U, int R, int DV>
inline void add_weighted(const float* const* w, const float* X, int j, f8 (&part)[2][R][DV]) {
    for (int u = 0; u < U; ++u) {
        f8 xj[DV];
        for (int d = 0; d < DV; ++d) xj[d] = load(X + (size_t)(j + u) * DV * W + d * W);
        for (int r = 0; r < R; ++r) {
            const f8 wj = splat(w[r][j + u]);
            for (int d = 0; d < DV; ++d) part[u][r][d] += wj * xj[d];
        }
    }
}

// acc[r] = sum over j < M of w[r][j] * X[j], for R weight rows at once over the contiguous rows X[j]:
// P V in the forward pass and dS K in the backward, for heads 16 to 32 wide.
template <int R, int DV>
inline void weighted_rows(const float* const* w, const float* X, int M, f8 (&acc)[R][DV]) {
    constexpr int U = R * DV >= 8 ? 1 : 2;  // keys per step, each with its own sums: 8 chains hide the FMA latency
    f8 part[2][R][DV];
    for (int u = 0; u < 2; ++u)
        for (int r = 0; r < R; ++r)
            for (int d = 0; d < DV; ++d) part[u][r][d] = splat(0.0f);
    int j = 0;
    for (; j + U <= M; j += U) add_weighted<U, R, DV>(w, X, j, part);
    for (; j < M; ++j) add_weighted<1, R, DV>(w, X, j, part);
    for (int r = 0; r < R; ++r)
        for (int d = 0; d < DV; ++d) acc[r][d] = part[0][r][d] + part[1][r][d];
}

// Lanes of two vectors by index (0-7 from a, 8-15 from b): GCC before 12 has only __builtin_shuffle.
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, i8{__VA_ARGS__})
#endif

// The eight vectors' horizontal sums as one vector: out[d] = sum of a[d]'s lanes.
inline f8 sum_lanes(const f8 (&a)[W]) {
    f8 b[4], c[2];
    for (int k = 0; k < 4; ++k)
        b[k] = SHUFFLE(a[2 * k], a[2 * k + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
               SHUFFLE(a[2 * k], a[2 * k + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int k = 0; k < 2; ++k)
        c[k] = SHUFFLE(b[2 * k], b[2 * k + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
               SHUFFLE(b[2 * k], b[2 * k + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return SHUFFLE(c[0], c[1], 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE(c[0], c[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

// qs[r] = q[r] scale log2(e), and qsr[r] pointing at it: scores of these rows come out in log2 units,
// for exp2, in the forward pass and in the backward's recomputation alike.
template <int R, int D>
inline void log2_scaled(const float* const* q, float scale, float (&qs)[R][D], const float* (&qsr)[R]) {
    for (int r = 0; r < R; ++r) {
        for (int c = 0; c < D; ++c) qs[r][c] = q[r][c] * (scale * LOG2E);
        qsr[r] = qs[r];
    }
}

// Forward for R query rows starting at i: softmax of the scores, then the probabilities times the
// values V, DV vectors of 8 per row (D = 8 DV): V is (8, Mp), transposed, for DV = 1, else (M, D) rows.
template <int R, int DV>
void forward_rows(const float* q, Strides sq, float* out, Strides so, float* lse, int b, int h, int i,
                  const float* Kt, const float* V, int M, int Mp, float scale, float* buf) {
    constexpr int D = DV * W;
    const float* qr[R];
    float* s[R];
    for (int r = 0; r < R; ++r) {
        qr[r] = row(q, sq, b, h, i + r);
        s[r] = buf + (size_t)r * Mp;
    }
    float qs[R][D];
    const float* qsr[R];
    log2_scaled(qr, scale, qs, qsr);
    scores<R>(qsr, Kt, D, M, Mp, s, -INFINITY);
    f8 vmax[R], m[R];
    for (int r = 0; r < R; ++r) vmax[r] = splat(-INFINITY);
    for (int j = 0; j < Mp; j += W)
        for (int r = 0; r < R; ++r) { f8 x = load(s[r] + j); vmax[r] = x > vmax[r] ? x : vmax[r]; }
    for (int r = 0; r < R; ++r) m[r] = splat(hmax(vmax[r]));
    if constexpr (DV == 1) {
        // Heads 8 wide: each row's probabilities go straight into its eight column sums against the
        // transposed values V (8, Mp), without a trip through memory. Eight independent sums, one
        // product each per step, keep both FMA units busy while the next exp is computed.
        for (int r = 0; r < R; ++r) {
            f8 acc[W], vsum = splat(0.0f);
            for (int d = 0; d < W; ++d) acc[d] = splat(0.0f);
            for (int j = 0; j < Mp; j += W) {
                const f8 p = exp2_8(load(s[r] + j) - m[r]);
                vsum += p;
                for (int d = 0; d < W; ++d) acc[d] += p * load(V + (size_t)d * Mp + j);
            }
            const float l = hsum(vsum);
            lse[i + r] = (m[r][0] + std::log2(l)) * LN2;
            store(row(out, so, b, h, i + r), sum_lanes(acc) / splat(l));
        }
    } else {
        // The R rows' softmaxes side by side: each exp is a long chain of dependent operations, and R
        // independent ones per step keep the vector units busy. Each row's arithmetic is as if alone.
        f8 vsum[R];
        for (int r = 0; r < R; ++r) vsum[r] = splat(0.0f);
        for (int j = 0; j < Mp; j += W)
            for (int r = 0; r < R; ++r) {
                f8 p = exp2_8(load(s[r] + j) - m[r]);
                store(s[r] + j, p);
                vsum[r] += p;
            }
        float l[R];
        for (int r = 0; r < R; ++r) {
            l[r] = hsum(vsum[r]);
            lse[i + r] = (m[r][0] + std::log2(l[r])) * LN2;
        }
        f8 acc[R][DV];
        weighted_rows<R, DV>(s, V, M, acc);
        for (int r = 0; r < R; ++r) {
            float* o = row(out, so, b, h, i + r);
            for (int d = 0; d < DV; ++d) store(o + d * W, acc[r][d] / splat(l[r]));
        }
    }
}

// Backward for R query rows starting at i: recompute the probabilities from lse into the rows P,
// dS = P (dO Vᵀ - rowsum(dO O)) scale into the rows dS, and dQ = dS K.
template <int R, int DV>
void backward_rows(const float* q, Strides sq, const float* out, Strides so, const float* dout, Strides sg,
                   const float* lse, float* dq, Strides sdq, int b, int h, int i, const float* Kt, const float* Vt,
                   const float* Kr, float* P, float* dS, int M, int Mp, float scale) {
    constexpr int D = DV * W;
    const float *qr[R], *gr[R];
    float *p[R], *ds[R];
    float delta[R];  // rowsum(dO * O): the softmax Jacobian's correction term
    for (int r = 0; r < R; ++r) {
        qr[r] = row(q, sq, b, h, i + r);
        gr[r] = row(dout, sg, b, h, i + r);
        const float* o = row(out, so, b, h, i + r);
        p[r] = P + (size_t)r * Mp;
        ds[r] = dS + (size_t)r * Mp;
        delta[r] = 0;
        for (int c = 0; c < D; ++c) delta[r] += gr[r][c] * o[c];
    }
    float qs[R][D];
    const float* qsr[R];
    log2_scaled(qr, scale, qs, qsr);
    scores<R>(qsr, Kt, D, M, Mp, p, -INFINITY);
    scores<R>(gr, Vt, D, M, Mp, ds, 0.0f);  // dP = dO Vᵀ, in place of dS
    if constexpr (DV == 1) {
        // Heads 8 wide: each row's dS goes straight into its eight column sums against Kᵀ, as in the forward.
        for (int r = 0; r < R; ++r) {
            f8 acc[W];
            for (int c = 0; c < W; ++c) acc[c] = splat(0.0f);
            for (int j = 0; j < Mp; j += W) {
                const f8 pj = exp2_8(load(p[r] + j) - splat(lse[i + r] * LOG2E));
                const f8 dsj = pj * (load(ds[r] + j) - splat(delta[r])) * splat(scale);
                store(p[r] + j, pj);
                store(ds[r] + j, dsj);
                for (int c = 0; c < W; ++c) acc[c] += dsj * load(Kt + (size_t)c * Mp + j);
            }
            store(row(dq, sdq, b, h, i + r), sum_lanes(acc));
        }
    } else {
        for (int j = 0; j < Mp; j += W)
            for (int r = 0; r < R; ++r) {
                const f8 pj = exp2_8(load(p[r] + j) - splat(lse[i + r] * LOG2E));
                store(p[r] + j, pj);
                store(ds[r] + j, pj * (load(ds[r] + j) - splat(delta[r])) * splat(scale));
            }
        f8 acc[R][DV];
        weighted_rows<R, DV>(ds, Kr, M, acc);
        for (int r = 0; r < R; ++r) {
            float* dqi = row(dq, sdq, b, h, i + r);
            for (int d = 0; d < DV; ++d) store(dqi + d * W, acc[r][d]);
        }
    }
}

// Xt[c][j] += sum over r < n of a_r[c] B[r][j], for Xt (D, Mp), the rows a_r = a + r * stride (D floats)
// and B (n, Mp): four columns by J key vectors held in registers along all n rows, so that Xt is read
// and written once per n rows.
template <int J>
inline void add_outer_tile(float* Xt, const float* a, int64_t stride, const float* B, int n, int D, int Mp, int j) {
    constexpr int C = 4;
    for (int c0 = 0; c0 < D; c0 += C) {
        f8 acc[C][J];
        for (int c = 0; c < C; ++c)
            for (int u = 0; u < J; ++u) acc[c][u] = splat(0.0f);
        for (int r = 0; r < n; ++r) {
            f8 bj[J];
            for (int u = 0; u < J; ++u) bj[u] = load(B + (size_t)r * Mp + j + u * W);
            const float* ar = a + r * stride + c0;
            for (int c = 0; c < C; ++c) {
                const f8 w = splat(ar[c]);
                for (int u = 0; u < J; ++u) acc[c][u] += w * bj[u];
            }
        }
        for (int c = 0; c < C; ++c)
            for (int u = 0; u < J; ++u) {
                float* x = Xt + (size_t)(c0 + c) * Mp + j + u * W;
                store(x, load(x) + acc[c][u]);
            }
    }
}

inline void add_outer(float* Xt, const float* a, int64_t stride, const float* B, int n, int D, int Mp) {
    int j = 0;
    for (; j + 2 * W <= Mp; j += 2 * W) add_outer_tile<2>(Xt, a, stride, B, n, D, Mp, j);
    for (; j < Mp; j += W) add_outer_tile<1>(Xt, a, stride, B, n, D, Mp, j);
}

constexpr int ROWS = 4;    // query rows per block: each key and value vector loaded once serves four rows
constexpr int CHUNK = 64;  // backward rows whose P and dS are kept, for their dK and dV in one pass

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
    float* P = buf;
    float* dS = buf + (size_t)CHUNK * Mp;
    for (int i0 = 0; i0 < N; i0 += CHUNK) {
        const int n = N - i0 < CHUNK ? N - i0 : CHUNK;
        int i = i0;
        for (; i + ROWS <= i0 + n; i += ROWS)
            backward_rows<ROWS, DV>(q, sq, out, so, dout, sg, lse, dq, sdq, b, h, i, Kt, Vt, Kr,
                                    P + (size_t)(i - i0) * Mp, dS + (size_t)(i - i0) * Mp, M, Mp, scale);
        for (; i < i0 + n; ++i)
            backward_rows<1, DV>(q, sq, out, so, dout, sg, lse, dq, sdq, b, h, i, Kt, Vt, Kr,
                                 P + (size_t)(i - i0) * Mp, dS + (size_t)(i - i0) * Mp, M, Mp, scale);
        // dK = dSᵀ Q and dV = Pᵀ dO over these rows.
        add_outer(dKt, row(q, sq, b, h, i0), sq.n, dS, n, DV * W, Mp);
        add_outer(dVt, row(dout, sg, b, h, i0), sg.n, P, n, DV * W, Mp);
    }
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
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < B * H; ++task) {
            if (failed) continue;
            const int b = task / H, h = task % H;
            transpose_in(k, sk, b, h, M, D, Mp, Kt);
            if (D == W) transpose_in(v, sv, b, h, M, D, Mp, Vr);  // (D, Mp), for the 8-wide path
            else gather_rows(v, sv, b, h, M, D, Vr);
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
        float* buf = alloc((size_t)2 * CHUNK * Mp);
        if (!Kt || !Vt || !Kr || !dKt || !dVt || !buf) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < B * H; ++task) {
            if (failed) continue;
            const int b = task / H, h = task % H;
            transpose_in(k, sk, b, h, M, D, Mp, Kt);
            transpose_in(v, sv, b, h, M, D, Mp, Vt);
            if (D > W) gather_rows(k, sk, b, h, M, D, Kr);  // dQ's rows for wide heads
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
