// Fused elementwise ops of inference, where torch runs one pass per op and, in bf16, converts to fp32
// and back in each: silu(g) * u of the SwiGLU MLP (fp32 arithmetic, one rounding at the end), and
// RMSNorm over any number of rows (rounded where norm.py's torch ops round; decode.cpp uses it too).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <omp.h>

#include "simd.h"

namespace {

using namespace hybridlm;

template <typename T>
void silu_mul(T* g, const T* u, int64_t n, int threads) {
    const int64_t blocks = (n + W - 1) / W;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t i = blk * W;
        const int w = static_cast<int>(std::min<int64_t>(W, n - i));
        const vf gv = load(g + i, w);
        store(g + i, gv * sigmoid(gv) * load(u + i, w), w);
    }
}

// out[i] = weight * round(x[i] * rsqrt(mean(x[i]^2) + eps)) for each row i, rounding to X (the input
// dtype) and then to the product's dtype as torch does: norm.py's ops, in one pass per row
template <typename X, typename Wt>
void rmsnorm(const X* x, X* out, const Wt* weight, float eps, int64_t rows, int64_t d, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
        const X* xr = x + i * d;
        X* o = out + i * d;
        vf ss = splat(0.0f);
        for (int64_t c = 0; c < d; c += W) {
            const vf v = load(xr + c, static_cast<int>(std::min<int64_t>(W, d - c)));
            ss += v * v;
        }
        const float s = 1.0f / std::sqrt(hsum(ss) / d + eps);
        for (int64_t c = 0; c < d; c += W) {
            const int w = static_cast<int>(std::min<int64_t>(W, d - c));
            vf v = load(xr + c, w) * s;
            if constexpr (!std::is_same_v<X, float>) v = widen(narrow(v));   // xf.to(x.dtype)
            store(o + c, v * load(weight + c, w), w);
        }
    }
}

}  // namespace

extern "C" {

// out [rows, d] = RMSNorm(x) * weight: x and out bf16 (act_bf16) or fp32, weight bf16 (w_bf16) or fp32;
// bf16 x needs a bf16 weight (torch would promote the product to fp32)
void hybridlm_rmsnorm(const void* x, void* out, int act_bf16, const void* weight, int w_bf16, float eps, int64_t rows,
                      int64_t d, int threads) {
    if (act_bf16)
        rmsnorm(static_cast<const bf16*>(x), static_cast<bf16*>(out), static_cast<const bf16*>(weight), eps, rows, d,
                threads);
    else if (w_bf16)
        rmsnorm(static_cast<const float*>(x), static_cast<float*>(out), static_cast<const bf16*>(weight), eps, rows,
                d, threads);
    else
        rmsnorm(static_cast<const float*>(x), static_cast<float*>(out), static_cast<const float*>(weight), eps, rows,
                d, threads);
}

// g [n] <- silu(g) * u, in place; bf16 when `bf16_io` is set, else fp32
void hybridlm_silu_mul(void* g, const void* u, int bf16_io, int64_t n, int threads) {
    if (bf16_io) silu_mul(static_cast<bf16*>(g), static_cast<const bf16*>(u), n, threads);
    else silu_mul(static_cast<float*>(g), static_cast<const float*>(u), n, threads);
}

}  // extern "C"
