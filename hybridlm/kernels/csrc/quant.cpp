// Dequantization of int8 / int4 weights (layouts in mat.h), and the int8 round trip of activations, for the
// paths that multiply many rows at once (prefill, scoring): the matrix is expanded to fp32 or bf16 once per
// call, then torch's GEMM runs on it. Values are computed in fp32 exactly as quant.py's reference does:
// q * scale, or (q - 8) * scale, or q * scale + min.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <omp.h>

#include "mat.h"
#include "simd.h"

namespace {

using namespace hybridlm;

// 8 fp32 values rounded to bf16 as f2bf rounds (finite values)
#ifdef __AVX2__
inline __m128i bf16x8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                                        _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
#endif

#ifdef __AVX2__
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(bf16* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16x8(v)); }

// Row `row` (< o) of a tile block: 32 integers as bytes in column order (int8: c, signed; int4: c0 columns
// 0..15 and c1 16..31, unsigned), times sc plus mn, into orow[0..32)
template <typename T, bool SIGNED>
inline void emit_row(T* orow, __m128i c0, __m128i c1, float sc, float mn) {
    const __m256 scv = _mm256_set1_ps(sc), mnv = _mm256_set1_ps(mn);
    const __m128i part[4] = {c0, _mm_srli_si128(c0, 8), c1, _mm_srli_si128(c1, 8)};
    for (int q = 0; q < 4; ++q) {          // q s + min, q s - 8 s (= (q - 8) s exactly), q s + 0
        const __m256i w = SIGNED ? _mm256_cvtepi8_epi32(part[q]) : _mm256_cvtepu8_epi32(part[q]);
        store8(orow + 8 * q, _mm256_fmadd_ps(_mm256_cvtepi32_ps(w), scv, mnv));
    }
}

// All 8 rows of tile t's block blk (32 whole columns): the block's dwords (s, i) (mat.h) transposed to
// (i, s) in registers, so each row's bytes are read once for the 8 rows rather than once per row.
template <typename T>
inline void tile_block(const Mat& m, int64_t t, int64_t blk, const float* sc, const float* mn, T* out,
                       int64_t k, int64_t rows) {
    const int64_t tb = m.kind == I8 ? 256 : 128;
    const uint8_t* wb = static_cast<const uint8_t*>(m.data) + (t * (m.ld / 32) + blk) * tb;
    auto ld = [&](int s) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * s)); };
    auto lane = [](__m256i v, int h) { return h ? _mm256_extracti128_si256(v, 1) : _mm256_castsi256_si128(v); };
    T* o0 = out + 8 * t * k + 32 * blk;
    if (m.kind == I4) {      // 4 x 8 dwords -> r[j]: row j (low lane) and row j + 4 (high lane), s = 0..3
        const __m256i a = ld(0), b = ld(1), c = ld(2), d = ld(3), low = _mm256_set1_epi8(15);
        const __m256i t0 = _mm256_unpacklo_epi32(a, b), t1 = _mm256_unpackhi_epi32(a, b);
        const __m256i t2 = _mm256_unpacklo_epi32(c, d), t3 = _mm256_unpackhi_epi32(c, d);
        const __m256i r[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                              _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
        for (int j = 0; j < 4; ++j) {   // dword s's bytes: low nibbles columns 8 s + 0..3, high 8 s + 4..7
            const __m256i lo = _mm256_and_si256(r[j], low), hi = _mm256_and_si256(_mm256_srli_epi16(r[j], 4), low);
            const __m256i c0 = _mm256_unpacklo_epi32(lo, hi), c1 = _mm256_unpackhi_epi32(lo, hi);
            for (int h = 0; h < 2; ++h) {
                const int i = j + 4 * h;
                if (i < rows) emit_row<T, false>(o0 + i * k, lane(c0, h), lane(c1, h), sc[i], mn[i]);
            }
        }
    } else {                 // 8 x 8 dwords -> row i's 8 dwords (s = 0..7): columns 4 s + 0..3
        __m256i v[8], u[8];
        for (int s = 0; s < 8; ++s) v[s] = ld(s);
        for (int h = 0; h < 2; ++h) {
            const __m256i* a = v + 4 * h;
            const __m256i t0 = _mm256_unpacklo_epi32(a[0], a[1]), t1 = _mm256_unpackhi_epi32(a[0], a[1]);
            const __m256i t2 = _mm256_unpacklo_epi32(a[2], a[3]), t3 = _mm256_unpackhi_epi32(a[2], a[3]);
            u[4 * h + 0] = _mm256_unpacklo_epi64(t0, t2);      // row 0 | row 4, s = 4 h .. 4 h + 3
            u[4 * h + 1] = _mm256_unpackhi_epi64(t0, t2);
            u[4 * h + 2] = _mm256_unpacklo_epi64(t1, t3);
            u[4 * h + 3] = _mm256_unpackhi_epi64(t1, t3);
        }
        for (int j = 0; j < 4; ++j)
            for (int h = 0; h < 2; ++h) {
                const int i = j + 4 * h;
                if (i >= rows) continue;
                const __m256i row = _mm256_permute2x128_si256(u[j], u[4 + j], h ? 0x31 : 0x20);   // s 0..3 | 4..7
                emit_row<T, true>(o0 + i * k, _mm256_castsi256_si128(row), _mm256_extracti128_si256(row, 1),
                                  sc[i], mn[i]);
            }
    }
}
#endif

template <typename T>
void dequantize_rows(const Mat& m, T* out, int64_t o, int64_t k, int threads) {
    const int64_t ld = m.ld, g = m.group, ng = ld / g, nb = ld / 32;
    const bool s16 = m.scale_bf16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < (o + 7) / 8; ++t) {
        const int64_t rows = std::min<int64_t>(8, o - 8 * t);
        for (int64_t blk = 0; blk < nb && blk * 32 < k; ++blk) {
            const int64_t G = blk * 32 / g, c0 = blk * 32, n = std::min<int64_t>(32, k - c0);
            float sc[8], mn[8];
            for (int i = 0; i < 8; ++i) {
                sc[i] = get(m.scale, (t * ng + G) * 8 + i, s16);
                mn[i] = m.min ? get(m.min, (t * ng + G) * 8 + i, s16) : (m.kind == I4 ? -8.0f * sc[i] : 0.0f);
            }
#ifdef __AVX2__
            if (n == 32) {
                tile_block(m, t, blk, sc, mn, out, k, rows);
                continue;
            }
#endif
            for (int i = 0; i < rows; ++i) {
                int32_t q[32];
                tile_q(m, t, blk, i, q);
                T* orow = out + (8 * t + i) * k;
                for (int64_t c = 0; c < n; ++c) {
                    const float v = std::fma(static_cast<float>(q[c]), sc[i], mn[i]);
                    if constexpr (std::is_same_v<T, float>) orow[c0 + c] = v;
                    else orow[c0 + c] = f2bf(v);
                }
            }
        }
    }
}

// One row's blocks of 32 columns (the last may be partial) quantized to int8 with scale d = max|x| / 127 and
// returned dequantized: out = round(x * (1 / d)) * d in fp32 (then rounded to out's type), as quant.py's
// quantize_activations and decode.cpp's quantize_x compute it.
template <typename TI, typename TO>
void fake_quant_row(const TI* x, TO* out, int64_t k) {
    for (int64_t c0 = 0; c0 < k; c0 += 32) {
        const int64_t n = std::min<int64_t>(32, k - c0);
        float v[32], amax = 0.0f;
        for (int64_t c = 0; c < n; ++c) {
            if constexpr (std::is_same_v<TI, float>) v[c] = x[c0 + c];
            else v[c] = bf2f(x[c0 + c]);
            amax = std::max(amax, std::fabs(v[c]));
        }
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
#ifdef __AVX2__
        if (n == 32) {
            const __m256 idv = _mm256_set1_ps(id), dv = _mm256_set1_ps(d);
            for (int q = 0; q < 4; ++q) {
                const __m256 r = _mm256_mul_ps(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * q), idv),
                                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), dv);
                if constexpr (std::is_same_v<TO, float>) _mm256_storeu_ps(out + c0 + 8 * q, r);
                else _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c0 + 8 * q), bf16x8(r));
            }
            continue;
        }
#endif
        for (int64_t c = 0; c < n; ++c) {
            const float r = std::nearbyint(v[c] * id) * d;
            if constexpr (std::is_same_v<TO, float>) out[c0 + c] = r;
            else out[c0 + c] = f2bf(r);
        }
    }
}

template <typename TI, typename TO>
void fake_quant(const void* x, void* out, int64_t rows, int64_t k, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r)
        fake_quant_row(static_cast<const TI*>(x) + r * k, static_cast<TO*>(out) + r * k, k);
}

}  // namespace

extern "C" {

// out [rows, k] (fp32 or bf16) = x [rows, k] (fp32 or bf16) quantized per 32-column block to int8 and back
// (fake_quant_row): the activations a prefill GEMM on dequantized weights multiplies
void hybridlm_quantize_act(const void* x, int x_bf16, void* out, int out_bf16, int64_t rows, int64_t k, int threads) {
    if (x_bf16 && out_bf16) fake_quant<bf16, bf16>(x, out, rows, k, threads);
    else if (x_bf16) fake_quant<bf16, float>(x, out, rows, k, threads);
    else if (out_bf16) fake_quant<float, bf16>(x, out, rows, k, threads);
    else fake_quant<float, float>(x, out, rows, k, threads);
}

// out [o, k] (fp32, or bf16 rounded to nearest even) = the dequantized matrix, padding columns dropped
void hybridlm_dequantize(const Mat* m, void* out, int out_bf16, int64_t o, int64_t k, int threads) {
    if (out_bf16) dequantize_rows(*m, static_cast<bf16*>(out), o, k, threads);
    else dequantize_rows(*m, static_cast<float*>(out), o, k, threads);
}

}  // extern "C"
