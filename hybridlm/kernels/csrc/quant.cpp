// Dequantization of int8 / int4 weights (layouts in mat.h) for the paths that multiply many rows at
// once (prefill, scoring): the matrix is expanded to fp32 or bf16 once per call, then torch's GEMM
// runs on it. Values are computed in fp32 exactly as quant.py's reference does: q * scale, or
// (q - 8) * scale, or q * scale + min.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <omp.h>

#include "mat.h"
#include "simd.h"

namespace {

using namespace hybridlm;

template <typename T>
void dequantize_rows(const Mat& m, T* out, int64_t o, int64_t k, int threads) {
    const int64_t ld = m.ld, g = m.group, ng = ld / g;
    const bool s16 = m.scale_bf16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < o; ++r) {
        T* orow = out + r * k;
        for (int64_t G = 0; G < ng && G * g < k; ++G) {
            const float sc = get(m.scale, r * ng + G, s16);
            const float mn = m.min ? get(m.min, r * ng + G, s16) : 0.0f;
            const int64_t c1 = std::min(k, (G + 1) * g);
#ifdef __AVX2__
            if constexpr (std::is_same_v<T, float>) {      // whole 32-column blocks in AVX2 registers
                const __m256 scv = _mm256_set1_ps(sc), mnv = _mm256_set1_ps(m.min ? mn : -8.0f * sc);
                int64_t c = G * g;
                for (; c + 32 <= c1; c += 32) {
                    __m256 w[4];
                    if (m.kind == I4) q32_avx2(static_cast<const uint8_t*>(m.data) + (r * ld + c) / 2, w);
                    else q32_avx2(static_cast<const int8_t*>(m.data) + r * ld + c, w);
                    for (int i = 0; i < 4; ++i)   // q s + min, q s - 8 s (= (q - 8) s exactly), q s
                        _mm256_storeu_ps(orow + c + 8 * i, m.kind == I4 ? _mm256_fmadd_ps(w[i], scv, mnv)
                                                                        : _mm256_mul_ps(w[i], scv));
                }
                if (c == c1) continue;
            }
#endif
            if (m.kind == I4) {
                const uint8_t* wr = static_cast<const uint8_t*>(m.data) + r * ld / 2;
                for (int64_t c = G * g; c < c1; c += 2 * W) {
                    vf lo, hi;
                    cvt_u4(wr + c / 2, lo, hi);
                    store(orow + c, m.min ? lo * sc + mn : (lo - 8.0f) * sc, static_cast<int>(std::min<int64_t>(W, c1 - c)));
                    if (c + W < c1)
                        store(orow + c + W, m.min ? hi * sc + mn : (hi - 8.0f) * sc,
                              static_cast<int>(std::min<int64_t>(W, c1 - c - W)));
                }
            } else {
                const int8_t* wr = static_cast<const int8_t*>(m.data) + r * ld;
                for (int64_t c = G * g; c < c1; c += W) {
                    const int w = static_cast<int>(std::min<int64_t>(W, c1 - c));
                    vf q = splat(0.0f);
                    if (w == W) q = cvt_s8(wr + c);
                    else for (int j = 0; j < w; ++j) q[j] = wr[c + j];
                    store(orow + c, q * sc, w);
                }
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
