// Fused elementwise ops of inference over many rows (prefill), where torch runs one pass per op and,
// in bf16, converts to fp32 and back in each: silu(g) * u of the SwiGLU MLP, and the residual add +
// RMSNorm between sublayers. fp32 arithmetic, one rounding to the tensor dtype at the end.
#include <algorithm>
#include <cmath>
#include <cstdint>

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

}  // namespace

extern "C" {

// g [n] <- silu(g) * u, in place; bf16 when `bf16_io` is set, else fp32
void hybridlm_silu_mul(void* g, const void* u, int bf16_io, int64_t n, int threads) {
    if (bf16_io) silu_mul(static_cast<bf16*>(g), static_cast<const bf16*>(u), n, threads);
    else silu_mul(static_cast<float*>(g), static_cast<const float*>(u), n, threads);
}

}  // extern "C"
