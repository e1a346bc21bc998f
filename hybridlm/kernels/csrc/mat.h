// A weight matrix as the kernels read it: fp32, bf16, or weight-only quantized int8 / int4
// (hybridlm/quant.py writes the quantized layouts; kernels/decode_cpu.py fills this struct).
//
//     kind     data                         value of element (row r, column c), group G = c / group
//     F32      float  [o, ld]               data[r, c]
//     BF16     bf16   [o, ld]               data[r, c]
//     I8       int8   [o, ld]               q * scale[r, G]                       (symmetric)
//     I4       uint8  [o, ld / 2]           (q - 8) * scale[r, G]                 (symmetric, min == null)
//                                           q * scale[r, G] + min[r, G]           (asymmetric)
//
// int4 packs each block of 32 columns into 16 bytes: byte j holds column j in its low nibble and column
// j + 16 in its high nibble (so one AND and one shift unpack 16 columns each; GGUF's Q4_0 blocks use
// the same order). Quantized rows are padded with zero weights to ld, a multiple of the group (a
// multiple of 32 for int4); `group` == ld means one scale per row. scale and min: [o, ld / group],
// fp32 or bf16 (scale_bf16).
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "simd.h"

namespace hybridlm {

enum MatKind : int64_t { F32 = 0, BF16 = 1, I8 = 2, I4 = 3 };

struct Mat {
    const void* data;
    const void* scale;
    const void* min;
    int64_t kind;
    int64_t ld;          // stored elements per row (>= the logical in-features k)
    int64_t group;       // columns per scale (quantized kinds)
    int64_t scale_bf16;  // scale and min are bf16 (else fp32)
};

typedef int8_t vs8 __attribute__((vector_size(W)));
typedef uint8_t vu8 __attribute__((vector_size(W)));

// W int8 values as fp32 lanes
inline vf cvt_s8(const int8_t* p) {
    vs8 v;
    std::memcpy(&v, p, sizeof(v));
    return __builtin_convertvector(v, vf);
}

// a 32-column int4 block (16 bytes) as its unsigned values 0..15: columns 0..15 and 16..31
inline void cvt_u4(const uint8_t* p, vf& lo, vf& hi) {
    vu8 v;
    std::memcpy(&v, p, sizeof(v));
    lo = __builtin_convertvector(v & 15, vf);
    hi = __builtin_convertvector(v >> 4, vf);
}

#ifdef __AVX2__
// The same conversions in AVX2 registers, 32 columns as four vectors of 8 (GCC splits the 16-lane vector
// types above into stack round trips here, ~8x slower; AVX-512 CPUs take this path too).
inline void q32_avx2(const int8_t* p, __m256 w[4]) {
    for (int i = 0; i < 4; ++i)
        w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i))));
}

inline void q32_avx2(const uint8_t* p, __m256 w[4]) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), m = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

}  // namespace hybridlm
