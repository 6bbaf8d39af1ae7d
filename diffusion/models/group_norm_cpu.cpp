// GroupNorm, optionally followed by SiLU, for fp32 channels-last maps on the CPU, and its backward pass.
//
// With channels last, a map is HW rows of C contiguous channels. A task is one image and a chunk of
// whole groups that is also a whole number of vectors: lcm(C/G, 8) channels, doubled while that divides
// C, up to 64. It sums each channel over the rows in vector registers, then combines the channels of
// each group, and writes y = x * a + s (a = rstd * weight, s = bias - mean * a, as PyTorch's kernel
// computes it), then SiLU. The chunks depend on C and G only, so the results do not depend on the
// batch or the number of threads; threads take tasks as they finish, as in attention_cpu.cpp.
//
// The sums are of x minus the channel's first value, in fp32 over blocks of 128 rows and in double
// across blocks: the variance then keeps its precision when the mean is large against the spread.
//
// Built by diffusion/models/cpu_kernels.py with g++ -O3 -march=native -fopenmp; called through ctypes.

#include <cmath>
#include <cstdint>
#include <omp.h>

#include "cpu_vec.h"

namespace {

using namespace kernels;

constexpr int CHUNK = 64;  // most channels in one task: 8 vectors of sums, 16 registers
constexpr int ROWS = 128;  // rows summed in fp32 before the sums move to double

// y * sigmoid(y), with sigmoid from e = e^-|y| in (0, 1]: 1 / (1 + e) for y >= 0 and e / (1 + e) below,
// so that no exponent overflows.
inline f8 sigmoid(f8 y) {
    const f8 zero = splat(0.0f), one = splat(1.0f);
    const f8 e = exp2_8((y < zero ? y : -y) * splat(LOG2E));
    return (y < zero ? e : one) / (one + e);
}

inline f8 silu(f8 y) { return y * sigmoid(y); }

// Adds a block's fp32 sums, nv vectors of them, to the double running sums.
inline void add_block(double* sums, const f8* block, int nv) {
    for (int v = 0; v < nv; ++v)
        for (int i = 0; i < W; ++i) sums[v * W + i] += block[v][i];
}

// Per channel c of [c0, c0 + n): s1 = Σ (x - k), s2 = Σ (x - k)² over the HW rows, with k = x[0][c].
void channel_sums(const float* x, int64_t HW, int C, int c0, int n, double* s1, double* s2, float* k) {
    const int nv = n / W;
    f8 shift[CHUNK / W];
    for (int v = 0; v < nv; ++v) {
        shift[v] = load(x + c0 + v * W);
        store(k + v * W, shift[v]);
    }
    for (int c = 0; c < n; ++c) s1[c] = s2[c] = 0.0;
    for (int64_t r0 = 0; r0 < HW; r0 += ROWS) {
        f8 a[CHUNK / W], b[CHUNK / W];
        for (int v = 0; v < nv; ++v) a[v] = b[v] = splat(0.0f);
        const int64_t r1 = r0 + ROWS < HW ? r0 + ROWS : HW;
        for (int64_t r = r0; r < r1; ++r) {
            const float* p = x + r * C + c0;
            for (int v = 0; v < nv; ++v) {
                const f8 d = load(p + v * W) - shift[v];
                a[v] += d;
                b[v] += d * d;
            }
        }
        add_block(s1, a, nv);
        add_block(s2, b, nv);
    }
}

// Each channel's group mean and 1 / std, for the channels [c0, c0 + n), n a whole number of groups of
// cpg channels, from channel_sums' sums.
void group_moments(const double* s1, const double* s2, const float* k, int64_t HW, int n, int cpg, float eps,
                   double* mean_c, double* rstd_c) {
    for (int g0 = 0; g0 < n; g0 += cpg) {
        double mean = 0.0;
        for (int c = g0; c < g0 + cpg; ++c) {
            mean_c[c] = k[c] + s1[c] / HW;
            mean += mean_c[c];
        }
        mean /= cpg;
        double m2 = 0.0;  // Σ (x - mean)² over the group: each channel's own, plus its mean's offset
        for (int c = g0; c < g0 + cpg; ++c) {
            const double d = mean_c[c] - mean;
            m2 += s2[c] - s1[c] * s1[c] / HW + HW * d * d;
        }
        const double var = m2 > 0.0 ? m2 / ((double)HW * cpg) : 0.0;
        const double rstd = 1.0 / std::sqrt(var + eps);
        for (int c = g0; c < g0 + cpg; ++c) {
            mean_c[c] = mean;
            rstd_c[c] = rstd;
        }
    }
}

// The affine map y = x * a + s of each channel of [c0, c0 + n).
void group_affine(const double* s1, const double* s2, const float* k, const float* weight, const float* bias,
                  int64_t HW, int c0, int n, int cpg, float eps, float* a, float* s) {
    double mean[CHUNK], rstd[CHUNK];
    group_moments(s1, s2, k, HW, n, cpg, eps, mean, rstd);
    for (int c = 0; c < n; ++c) {
        const double ac = rstd[c] * weight[c0 + c];
        a[c] = (float)ac;
        s[c] = (float)(bias[c0 + c] - mean[c] * ac);
    }
}

// The chunk width for C channels in G groups (see the top of the file), or 0 where there is none.
int chunk_width(int C, int G) {
    if (G <= 0 || C % G || C % W) return 0;
    const int cpg = C / G;
    int chunk = cpg;
    while (chunk % W) chunk += cpg;
    if (chunk > CHUNK) return 0;
    while (2 * chunk <= CHUNK && C % (2 * chunk) == 0) chunk *= 2;  // longer runs of each row
    return chunk;
}

}  // namespace

extern "C" {

// out = GroupNorm(x) with G groups, then SiLU if silu; x and out (B, HW, C) contiguous, weight and bias
// (C). Returns 2 where C is not a multiple of 8 and of G, or a chunk would exceed 64 channels.
int group_norm_forward(const float* x, const float* weight, const float* bias, float* out,
                       int B, int64_t HW, int C, int G, float eps, int silu_after, int threads) {
    const int chunk = chunk_width(C, G);
    if (!chunk) return 2;
    const int cpg = C / G;
    const int chunks = C / chunk, nv = chunk / W;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int task = 0; task < B * chunks; ++task) {
        const int b = task / chunks, c0 = task % chunks * chunk;
        const float* xb = x + (int64_t)b * HW * C;
        float* ob = out + (int64_t)b * HW * C;
        double s1[CHUNK], s2[CHUNK];
        float k[CHUNK], a[CHUNK], s[CHUNK];
        channel_sums(xb, HW, C, c0, chunk, s1, s2, k);
        group_affine(s1, s2, k, weight, bias, HW, c0, chunk, cpg, eps, a, s);
        f8 av[CHUNK / W], sv[CHUNK / W];
        for (int v = 0; v < nv; ++v) {
            av[v] = load(a + v * W);
            sv[v] = load(s + v * W);
        }
        for (int64_t r = 0; r < HW; ++r) {
            const float* p = xb + r * C + c0;
            float* q = ob + r * C + c0;
            if (silu_after)
                for (int v = 0; v < nv; ++v) store(q + v * W, silu(load(p + v * W) * av[v] + sv[v]));
            else
                for (int v = 0; v < nv; ++v) store(q + v * W, load(p + v * W) * av[v] + sv[v]);
        }
    }
    return 0;
}

// The gradients of group_norm_forward (same arguments) for the incoming gradient dy (B, HW, C): dx
// (B, HW, C), and each image's share of the weight's and bias's, dweight_b and dbias_b (B, C), which the
// caller sums over the images in a fixed order. With z = x * a + s the norm's output and dz the gradient
// at z (dy, or dy * silu'(z)), and per group x̂ = (x - mean) * rstd and N = HW * C / G:
//     dbias_c = Σ dz,  dweight_c = Σ dz x̂,  dx = rstd (w_c dz - Σ_g w dz / N - x̂ Σ_g w dz x̂ / N).
// dz goes through dx's memory between the two passes over the rows. The statistics are recomputed from x
// as the forward pass computes them: saving them would cost the forward pass more than this does.
int group_norm_backward(const float* dy, const float* x, const float* weight, const float* bias, float* dx,
                        float* dweight_b, float* dbias_b, int B, int64_t HW, int C, int G, float eps,
                        int silu_after, int threads) {
    const int chunk = chunk_width(C, G);
    if (!chunk) return 2;
    const int cpg = C / G, chunks = C / chunk, nv = chunk / W;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int task = 0; task < B * chunks; ++task) {
        const int b = task / chunks, c0 = task % chunks * chunk;
        const int64_t off = (int64_t)b * HW * C + c0;
        double s1[CHUNK], s2[CHUNK], mean[CHUNK], rstd[CHUNK];
        float k[CHUNK], a[CHUNK], s[CHUNK];
        channel_sums(x + off - c0, HW, C, c0, chunk, s1, s2, k);
        group_moments(s1, s2, k, HW, chunk, cpg, eps, mean, rstd);
        // z = (x - k) * a + s here: shifted by k, x * a does not round away z's digits when the mean is
        // large against the spread.
        for (int c = 0; c < chunk; ++c) {
            const double ac = rstd[c] * weight[c0 + c];
            a[c] = (float)ac;
            s[c] = (float)(bias[c0 + c] + (k[c] - mean[c]) * ac);
        }
        // Σ dz and Σ dz (x - k) per channel, in fp32 over blocks of rows and in double across blocks.
        double sum_dz[CHUNK] = {}, sum_dzx[CHUNK] = {};
        f8 av[CHUNK / W], sv[CHUNK / W], kv[CHUNK / W];
        for (int v = 0; v < nv; ++v) {
            av[v] = load(a + v * W);
            sv[v] = load(s + v * W);
            kv[v] = load(k + v * W);
        }
        for (int64_t r0 = 0; r0 < HW; r0 += ROWS) {
            f8 p[CHUNK / W], q[CHUNK / W];
            for (int v = 0; v < nv; ++v) p[v] = q[v] = splat(0.0f);
            const int64_t r1 = r0 + ROWS < HW ? r0 + ROWS : HW;
            for (int64_t r = r0; r < r1; ++r) {
                const int64_t o = off + r * C;
                for (int v = 0; v < nv; ++v) {
                    const f8 xk = load(x + o + v * W) - kv[v];
                    f8 dz = load(dy + o + v * W);
                    if (silu_after) {
                        const f8 z = xk * av[v] + sv[v], sg = sigmoid(z);
                        dz = dz * sg * (splat(1.0f) + z * (splat(1.0f) - sg));
                        store(dx + o + v * W, dz);
                    }
                    p[v] += dz;
                    q[v] += dz * xk;
                }
            }
            add_block(sum_dz, p, nv);
            add_block(sum_dzx, q, nv);
        }
        // dx = dz * a + (x - k) * m + u per channel: a = rstd w as above, m = -rstd² S2 / N and
        // u = -rstd S1 / N + m (k - mean), with S1 = Σ_g w dz and S2 = Σ_g w dz x̂ over the channel's group.
        float m[CHUNK], u[CHUNK];
        const double N = (double)HW * cpg;
        for (int g0 = 0; g0 < chunk; g0 += cpg) {
            double S1 = 0.0, S2 = 0.0;
            for (int c = g0; c < g0 + cpg; ++c) {
                const double dz_xhat = rstd[c] * (sum_dzx[c] + (k[c] - mean[c]) * sum_dz[c]);  // Σ dz x̂
                dbias_b[(int64_t)b * C + c0 + c] = (float)sum_dz[c];
                dweight_b[(int64_t)b * C + c0 + c] = (float)dz_xhat;
                S1 += weight[c0 + c] * sum_dz[c];
                S2 += weight[c0 + c] * dz_xhat;
            }
            for (int c = g0; c < g0 + cpg; ++c) {
                const double mc = -rstd[c] * rstd[c] * S2 / N;
                m[c] = (float)mc;
                u[c] = (float)(-rstd[c] * S1 / N + mc * (k[c] - mean[c]));
            }
        }
        f8 mv[CHUNK / W], uv[CHUNK / W];
        for (int v = 0; v < nv; ++v) {
            mv[v] = load(m + v * W);
            uv[v] = load(u + v * W);
        }
        const float* dz_rows = silu_after ? dx : dy;
        for (int64_t r = 0; r < HW; ++r) {
            const int64_t o = off + r * C;
            for (int v = 0; v < nv; ++v)
                store(dx + o + v * W, load(dz_rows + o + v * W) * av[v] + (load(x + o + v * W) - kv[v]) * mv[v] + uv[v]);
        }
    }
    return 0;
}

}  // extern "C"
