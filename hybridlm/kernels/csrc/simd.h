// Vector helpers shared by the CPU kernels in csrc/.
//
// GCC's vector extensions make the vectorisation explicit instead of hoping the auto-vectoriser
// takes every loop; with -march=native a vf is one AVX-512 register (two AVX2 registers).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace hybridlm {

// Channels per vector; 32 and 64 (two and four registers) measured slower in the scan.
constexpr int W = 16;
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef float v4 __attribute__((vector_size(16)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));

// bfloat16 as its bits: the top half of an fp32
typedef uint16_t bf16;
typedef uint16_t vh __attribute__((vector_size(2 * W)));

inline vf splat(float x) { return vf{} + x; }

// exp(x) = 2^k * exp(r), k = round(x / ln 2), |r| <= ln2 / 2, exp(r) by its degree-7 Taylor
// polynomial: relative error < 2e-7, a few ulp, in ~15 vector instructions (libm's expf is scalar).
// With AVX-512, vscalefps applies 2^k, underflowing through the subnormals to 0 and overflowing to
// inf by itself, so only the clamp that keeps r finite at +-inf remains.
inline vf vexp(vf x) {
#ifdef __AVX512F__
    vf xc = x < -104.0f ? splat(-104.0f) : x;     // exp(-104) = 0 in fp32
    xc = xc > 89.0f ? splat(89.0f) : xc;           // exp(89) = inf in fp32
    const vf k = (vf)_mm512_roundscale_ps((__m512)(xc * 1.44269504f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    const float lo = -87.33f, hi = 88.3f;
    vf xc = x < lo ? splat(lo) : x;
    xc = xc > hi ? splat(hi) : xc;
    const float round = 12582912.0f;             // 1.5 * 2^23: adding it rounds to an integer
    const vf k = (xc * 1.44269504f + round) - round;
#endif
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
#ifdef __AVX512F__
    return (vf)_mm512_scalef_ps((__m512)p, (__m512)k);
#else
    vi bits = (__builtin_convertvector(k, vi) + 127) << 23;
    return x < lo ? splat(0.0f) : p * __builtin_bit_cast(vf, bits);
#endif
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// vexp for 8 lanes in AVX2 registers (CPUs without AVX-512). The scans' loops over the state size run on
// these: through the 16-lane vector type (two AVX2 registers per value) the compiler kept the state
// vectors' halves and vexp's temporaries on the stack (selective_scan.cpp's loops ran 4.5-5.5x slower).
inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33f), hi = _mm256_set1_ps(88.3f), round = _mm256_set1_ps(12582912.0f);
    const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    const __m256 k = _mm256_sub_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504f), round), round);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145752f), xc);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.98412698e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.38888889e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.33333333e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.16666667e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.66666667e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}
#endif

// 1 / (1 + exp(-x)); exp(-x) goes to 0 or to inf (~1e38 without AVX-512) at the extremes, which
// gives the right limits (1 and 0).
inline vf sigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }

// log(1 + exp(x)) as max(x, 0) + log1p(exp(-|x|)): with e = exp(-|x|) in (0, 1], log1p(e) =
// 2 atanh(s), s = e / (2 + e) <= 1/3, whose odd series to s^13 is within 2e-8 relative. Equal in
// fp32 to torch's softplus (which returns x above 20, where log1p(exp(-x)) < ulp(x)).
inline vf softplus(vf x) {
    const vf ax = x < 0.0f ? -x : x;
    const vf e = vexp(-ax), s = e / (2.0f + e), s2 = s * s;
    vf p = splat(1.0f / 13);
    p = p * s2 + 1.0f / 11;
    p = p * s2 + 1.0f / 9;
    p = p * s2 + 1.0f / 7;
    p = p * s2 + 1.0f / 5;
    p = p * s2 + 1.0f / 3;
    p = p * s2 + 1.0f;
    return (x < 0.0f ? splat(0.0f) : x) + 2.0f * s * p;
}

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

inline float bf2f(bf16 h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline bf16 f2bf(float f) {   // round to nearest even, as torch does
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return 0x7fc0;   // NaN
    u += 0x7fff + ((u >> 16) & 1);
    return static_cast<bf16>(u >> 16);
}

// element i of an fp32 or bf16 array, as fp32
inline float get(const void* p, int64_t i, bool is_bf16) {
    return is_bf16 ? bf2f(static_cast<const bf16*>(p)[i]) : static_cast<const float*>(p)[i];
}

// W bf16 values as fp32 lanes, and back (rounded as f2bf rounds)
inline vf widen(vh h) {
    vu u = __builtin_convertvector(h, vu) << 16;
    return __builtin_bit_cast(vf, u);
}

inline vh narrow(vf v) {
    const vu u = __builtin_bit_cast(vu, v);
    vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    r = (u & 0x7fffffffu) > 0x7f800000u ? vu{} + 0x7fc0u : r;
    return __builtin_convertvector(r, vh);
}

inline vf load(const bf16* src, int w) {
    if (w == W) {
        vh h;
        std::memcpy(&h, src, sizeof(h));
        return widen(h);
    }
    vf v = splat(0.0f);
    for (int j = 0; j < w; ++j) v[j] = bf2f(src[j]);
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

inline void store(bf16* dst, vf v, int w) {
    const vh h = narrow(v);
    if (w == W) {
        std::memcpy(dst, &h, sizeof(h));
    } else {
        for (int j = 0; j < w; ++j) dst[j] = h[j];
    }
}

// Consecutive timesteps of a block are d_in floats apart, usually a new 4 KiB page, where the
// hardware prefetchers stop; fetch the row PF steps ahead by hand (measured 15-30% faster at
// l = 8192, d_in = 1024, where the tensors no longer fit in the L3 cache).
constexpr int64_t PF = 16;
inline void prefetch(const void* p, bool write = false) {
    if (write) __builtin_prefetch(p, 1);
    else __builtin_prefetch(p, 0);
}

}  // namespace hybridlm
