// Vector helpers shared by the CPU kernels (selective_scan.cpp, causal_conv1d.cpp).
//
// GCC's vector extensions make the vectorisation explicit instead of hoping the auto-vectoriser
// takes every loop; with -march=native a vf is one AVX-512 register (two AVX2 registers).
#pragma once

#include <cstdint>
#include <cstring>

namespace hybridlm {

// Channels per vector; 32 and 64 (two and four registers) measured slower in the scan.
constexpr int W = 16;
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef float v4 __attribute__((vector_size(16)));

inline vf splat(float x) { return vf{} + x; }

// exp(x) = 2^k * exp(r), k = round(x / ln 2), |r| <= ln2 / 2, exp(r) by its degree-7 Taylor
// polynomial: relative error < 2e-7, a few ulp, in ~15 vector instructions (libm's expf is scalar).
inline vf vexp(vf x) {
    const float lo = -87.33f, hi = 88.3f;
    vf xc = x < lo ? splat(lo) : x;
    xc = xc > hi ? splat(hi) : xc;
    const float round = 12582912.0f;             // 1.5 * 2^23: adding it rounds to an integer
    vf k = (xc * 1.44269504f + round) - round;
    vf r = xc - k * 0.693145752f;                 // ln 2 in two parts (Cody & Waite) keeps r exact
    r = r - k * 1.42860677e-6f;
    vf p = splat(1.98412698e-4f);
    p = p * r + 1.38888889e-3f;
    p = p * r + 8.33333333e-3f;
    p = p * r + 4.16666667e-2f;
    p = p * r + 1.66666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vi bits = (__builtin_convertvector(k, vi) + 127) << 23;
    return x < lo ? splat(0.0f) : p * reinterpret_cast<vf&>(bits);
}

// 1 / (1 + exp(-x)); exp(-x) saturates to 0 or ~1e38 at the extremes, which gives the right
// limits (1 and 0).
inline vf sigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }

// Sum of the lanes by halving in registers: a lane-by-lane loop is a chain of W dependent scalar
// adds through the stack, which dominated the scan's backward.
inline float hsum(vf v) {
    v4 q[W / 4];
    std::memcpy(q, &v, sizeof(v));
    for (int half = W / 8; half > 0; half /= 2)
        for (int j = 0; j < half; ++j) q[j] += q[j + half];
    return (q[0][0] + q[0][2]) + (q[0][1] + q[0][3]);
}

// Channels d0..d0+w of a row. The last block of a row may be partial: its missing lanes read as
// zero and are never written back.
inline vf load(const float* src, int w) {
    vf v;
    if (w == W) {
        std::memcpy(&v, src, sizeof(v));
    } else {
        v = splat(0.0f);
        for (int j = 0; j < w; ++j) v[j] = src[j];
    }
    return v;
}

// A memcpy of a runtime length would compile to `rep movs`, tens of cycles per vector.
inline void store(float* dst, vf v, int w) {
    if (w == W) {
        std::memcpy(dst, &v, sizeof(v));
    } else {
        for (int j = 0; j < w; ++j) dst[j] = v[j];
    }
}

// Consecutive timesteps of a block are d_in floats apart, usually a new 4 KiB page, where the
// hardware prefetchers stop; fetch the row PF steps ahead by hand (measured 15-30% faster at
// l = 8192, d_in = 1024, where the tensors no longer fit in the L3 cache).
constexpr int64_t PF = 16;
inline void prefetch(const float* p, bool write = false) {
    if (write) __builtin_prefetch(p, 1);
    else __builtin_prefetch(p, 0);
}

}  // namespace hybridlm
