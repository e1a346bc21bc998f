// A weight matrix as the kernels read it: fp32, bf16, or weight-only quantized int8 / int4
// (hybridlm/quant.py writes the quantized layouts; kernels/decode_cpu.py fills this struct).
//
// Quantized kinds are stored in tiles of 8 output rows (T = ceil(o / 8); quant.py's module docstring):
//
//     kind     data                               value of element (row r = 8 t + i, column c = 32 blk + ...)
//     F32      float  [o, ld]                     data[r, c]
//     BF16     bf16   [o, ld]                     data[r, c]
//     I8       int8   [T, ld / 32, 8 x 8 x 4]     byte (s, i, j) = q of column 4 s + j; q * scale
//     I4       uint8  [T, ld / 32, 4 x 8 x 4]     byte (s, i, j) = q of column 8 s + j (low nibble) and of
//                                                 8 s + 4 + j (high); (q - 8) * scale (symmetric, min ==
//                                                 null) or q * scale + min (asymmetric)
//
// scale and min: [T, ld / group, 8] (row i of each group's 8), fp32 or bf16 (scale_bf16); `group` == ld
// means one scale per row. Quantized rows are padded with zero weights to ld (a multiple of 32 and of the
// group); the tile rows past o are zero.
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

// the 32 integers of row i of tile t's block blk (int8: -127..127; int4: 0..15), into q
inline void tile_q(const Mat& m, int64_t t, int64_t blk, int i, int32_t* q) {
    const int64_t tb = m.kind == I8 ? 256 : 128;
    const uint8_t* wb = static_cast<const uint8_t*>(m.data) + (t * (m.ld / 32) + blk) * tb + 4 * i;
    for (int s = 0; s < (m.kind == I8 ? 8 : 4); ++s)
        for (int j = 0; j < 4; ++j) {
            const uint8_t v = wb[32 * s + j];
            if (m.kind == I8) q[4 * s + j] = static_cast<int8_t>(v);
            else q[8 * s + j] = v & 15, q[8 * s + 4 + j] = v >> 4;
        }
}

#ifdef __AVX2__
inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

}  // namespace hybridlm
