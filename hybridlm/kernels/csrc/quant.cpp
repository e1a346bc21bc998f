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

template <typename T>
void dequantize_rows(const Mat& m, T* out, int64_t o, int64_t k, int threads) {
    const int64_t ld = m.ld, g = m.group, ng = ld / g, nb = ld / 32;
    const bool s16 = m.scale_bf16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < o; ++r) {
        const int64_t t = r / 8;
        const int i = static_cast<int>(r % 8);
        T* orow = out + r * k;
        for (int64_t blk = 0; blk < nb && blk * 32 < k; ++blk) {
            const int64_t G = blk * 32 / g, c0 = blk * 32, n = std::min<int64_t>(32, k - c0);
            const float sc = get(m.scale, (t * ng + G) * 8 + i, s16);
            const float mn = m.min ? get(m.min, (t * ng + G) * 8 + i, s16) : (m.kind == I4 ? -8.0f * sc : 0.0f);
#ifdef __AVX2__
            if (n == 32) {                                  // whole blocks in AVX2 registers
                __m256 w[4];
                tile_q32_avx2(m, t, blk, i, w);
                const __m256 scv = _mm256_set1_ps(sc), mnv = _mm256_set1_ps(mn);
                for (int q = 0; q < 4; ++q) {   // q s + min, q s - 8 s (= (q - 8) s exactly), q s + 0
                    const __m256 v = _mm256_fmadd_ps(w[q], scv, mnv);
                    if constexpr (std::is_same_v<T, float>) {
                        _mm256_storeu_ps(orow + c0 + 8 * q, v);
                    } else {
                        _mm_storeu_si128(reinterpret_cast<__m128i*>(orow + c0 + 8 * q), bf16x8(v));
                    }
                }
                continue;
            }
#endif
            int32_t q[32];
            tile_q(m, t, blk, i, q);
            for (int64_t c = 0; c < n; ++c) {
                const float v = std::fma(static_cast<float>(q[c]), sc, mn);
                if constexpr (std::is_same_v<T, float>) orow[c0 + c] = v;
                else orow[c0 + c] = f2bf(v);
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
