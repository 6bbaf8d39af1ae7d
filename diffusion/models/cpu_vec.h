// Vector helpers shared by the CPU kernels (attention_cpu.cpp, group_norm_cpu.cpp): eight fp32 lanes as
// GCC vector extensions, which -march=native maps to AVX2 (or to what the CPU has).

#pragma once

#include <cstdint>
#include <cstring>

namespace kernels {

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
constexpr int W = 8;

inline f8 load(const float* p) { f8 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, f8 v) { std::memcpy(p, &v, sizeof v); }
inline f8 splat(float x) { return f8{x, x, x, x, x, x, x, x}; }
inline float hsum(f8 v) { float s = 0; for (int i = 0; i < W; ++i) s += v[i]; return s; }
inline float hmax(f8 v) { float m = v[0]; for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m; return m; }

// 2^x for x <= 0, as Cephes' exp2f computes it: x = n + f with n = round(x) and |f| <= 1/2, then
// 2^f = 1 + f P(f) with a degree-5 minimax P, times 2^n put into the exponent bits. Adding
// 1.5 * 2^23 + 127 rounds x to an integer and leaves n + 127, the biased exponent, in the low bits;
// shifting them up by 23 makes 2^n. Below -127 the exponent is 0 and so is the result, without a
// compare: -inf (the padding) and underflow both give exactly 0. Relative error under 2e-7.
inline f8 exp2_8(f8 x) {
    const f8 magic = splat(12583039.0f);  // 1.5 * 2^23 + 127
    x = x > splat(-127.0f) ? x : splat(-127.0f);
    const f8 shifted = x + magic;
    const f8 f = x - (shifted - magic);
    f8 y = splat(1.535336188319500e-4f);
    y = y * f + splat(1.339887440266574e-3f);
    y = y * f + splat(9.618437357674640e-3f);
    y = y * f + splat(5.550332471162809e-2f);
    y = y * f + splat(2.402264791363012e-1f);
    y = y * f + splat(6.931472028550421e-1f);
    y = y * f + splat(1.0f);
    i8 bits;
    std::memcpy(&bits, &shifted, sizeof bits);
    bits <<= 23;
    f8 pow2;
    std::memcpy(&pow2, &bits, sizeof pow2);
    return y * pow2;
}

constexpr float LOG2E = 1.44269504088896341f, LN2 = 0.693147180559945309f;

}  // namespace kernels
