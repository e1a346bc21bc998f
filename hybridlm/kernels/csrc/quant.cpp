// Dequantization of int8 / int4 weights (layouts in mat.h) for the paths that multiply many rows at
// once (prefill, scoring): the matrix is expanded to fp32 or bf16 once per call, then torch's GEMM
// runs on it. Values are computed in fp32 exactly as quant.py's reference does: q * scale, or
// (q - 8) * scale, or q * scale + min.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <omp.h>

#include "mat.h"
#include "simd.h"

namespace {

using namespace hybridlm;

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
            if constexpr (std::is_same_v<T, float>) {      // whole blocks in AVX2 registers
                if (n == 32) {
                    __m256 w[4];
                    tile_q32_avx2(m, t, blk, i, w);
                    const __m256 scv = _mm256_set1_ps(sc), mnv = _mm256_set1_ps(mn);
                    for (int q = 0; q < 4; ++q)   // q s + min, q s - 8 s (= (q - 8) s exactly), q s + 0
                        _mm256_storeu_ps(orow + c0 + 8 * q, _mm256_fmadd_ps(w[q], scv, mnv));
                    continue;
                }
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

}  // namespace

extern "C" {

// out [o, k] (fp32, or bf16 rounded to nearest even) = the dequantized matrix, padding columns dropped
void hybridlm_dequantize(const Mat* m, void* out, int out_bf16, int64_t o, int64_t k, int threads) {
    if (out_bf16) dequantize_rows(*m, static_cast<bf16*>(out), o, k, threads);
    else dequantize_rows(*m, static_cast<float*>(out), o, k, threads);
}

}  // extern "C"
