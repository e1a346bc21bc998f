// Depthwise causal conv1d + SiLU (Mamba's short conv before the scan), forward and backward.
//
//     out[t, d] = silu(bias[d] + sum_j w[j, d] * X[t - (k-1) + j, d])
//
// where X is x preceded by the k-1 inputs before it (prev: the conv state, or zeros).
// Shapes (fp32 and contiguous, except that the forward may read x with a row stride and x/out in bf16):
//     x, out, gout, gx   [b, l, d]
//     prev               [b, k-1, d]   inputs before x (the state, transposed)
//     wT                 [k, d]        the weight transposed: channels contiguous, like x
//     bias               [d] or null
//     gw_part, gb_part   [threads, k, d], [threads, d]   per-thread partial sums, zeroed by the caller
//
// A few operations per element, so the split is over rows: a thread takes a run of consecutive
// timesteps and streams through them at full width (contiguous memory, vectors over channels).
// The pre-activation is recomputed in the backward rather than stored.
#include <algorithm>
#include <cstdint>
#include <vector>

#include <omp.h>

#include "simd.h"

namespace {

using namespace hybridlm;

// x of element type T with row stride ldx (the forward may read bf16 and a column slice of in_proj's
// output in place); prev, the weights and the arithmetic are fp32
template <typename T>
struct Conv {
    const T* x;
    int64_t ldx;
    const float *prev, *wT, *bias;
    int64_t l, d, k;

    // input row tau (tau < 0: from the state) of batch row bi, channels d0..d0+w
    vf in(int64_t bi, int64_t tau, int64_t d0, int w) const {
        return tau >= 0 ? load(x + (bi * l + tau) * ldx + d0, w) : load(prev + (bi * (k - 1) + (k - 1) + tau) * d + d0, w);
    }

    // the pre-activation of output row t: it reads input rows t-k+1 .. t
    vf pre(int64_t bi, int64_t t, int64_t d0, int w) const {
        vf acc = bias ? load(bias + d0, w) : splat(0.0f);
        for (int64_t j = 0; j < k; ++j) acc += load(wT + j * d + d0, w) * in(bi, t - (k - 1) + j, d0, w);
        return acc;
    }
};

// rows [r0, r1) of item `item` when each batch row is cut into `chunks` runs
inline void rows_of(int64_t item, int64_t chunks, int64_t l, int64_t& bi, int64_t& r0, int64_t& r1) {
    const int64_t per = (l + chunks - 1) / chunks;
    bi = item / chunks;
    r0 = std::min(l, (item % chunks) * per);
    r1 = std::min(l, r0 + per);
}

}  // namespace

extern "C" {

}  // extern "C"

namespace {

template <typename T>
void conv_fwd(const Conv<T>& cv, T* out, int64_t b, int threads) {
    const int64_t l = cv.l, d = cv.d;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < b * threads; ++item) {
        int64_t bi, r0, r1;
        rows_of(item, threads, l, bi, r0, r1);
        for (int64_t t = r0; t < r1; ++t)
            for (int64_t d0 = 0; d0 < d; d0 += W) {
                const int w = static_cast<int>(std::min<int64_t>(W, d - d0));
                const vf p = cv.pre(bi, t, d0, w);
                store(out + (bi * l + t) * d + d0, p * sigmoid(p), w);
            }
    }
}

}  // namespace

extern "C" {

// x [b, l, d] with row stride ldx and out [b, l, d] contiguous: bf16 when `bf16_io` is set, else fp32
void hybridlm_conv_fwd(const void* x, int64_t ldx, const float* prev, const float* wT, const float* bias, void* out,
                       int bf16_io, int64_t b, int64_t l, int64_t d, int64_t k, int threads) {
    if (bf16_io)
        conv_fwd(Conv<bf16>{static_cast<const bf16*>(x), ldx, prev, wT, bias, l, d, k}, static_cast<bf16*>(out), b,
                 threads);
    else
        conv_fwd(Conv<float>{static_cast<const float*>(x), ldx, prev, wT, bias, l, d, k}, static_cast<float*>(out), b,
                 threads);
}

void hybridlm_conv_bwd(const float* x, const float* prev, const float* wT, const float* bias, const float* gout,
                       float* gx, float* gw_part, float* gb_part, int64_t b, int64_t l, int64_t d, int64_t k,
                       int threads) {
    const Conv<float> cv{x, d, prev, wT, bias, l, d, k};
#pragma omp parallel num_threads(threads)
    {
        // dL/dpre of the k rows t..t+k-1 that gx[t] needs, in a ring indexed by row % k
        std::vector<float> ring(k * d);
        float* gw = gw_part + omp_get_thread_num() * k * d;
        float* gb = gb_part + omp_get_thread_num() * d;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < b * threads; ++item) {
            int64_t bi, r0, r1;
            rows_of(item, threads, l, bi, r0, r1);
            // dL/dpre of row tau into the ring; the weight and bias gradients count a row only in
            // the run that owns it (the k-1 rows past r1 are recomputed here but owned by the next)
            auto grad_pre = [&](int64_t tau) {
                float* g = ring.data() + (tau % k) * d;
                for (int64_t d0 = 0; d0 < d; d0 += W) {
                    const int w = static_cast<int>(std::min<int64_t>(W, d - d0));
                    const vf p = cv.pre(bi, tau, d0, w), s = sigmoid(p);
                    const vf gp = load(gout + (bi * l + tau) * d + d0, w) * s * (1.0f + p * (1.0f - s));
                    store(g + d0, gp, w);
                    if (tau < r1) {
                        store(gb + d0, load(gb + d0, w) + gp, w);
                        for (int64_t j = 0; j < k; ++j)
                            store(gw + j * d + d0, load(gw + j * d + d0, w) + gp * cv.in(bi, tau - (k - 1) + j, d0, w), w);
                    }
                }
            };
            for (int64_t tau = r0; tau < std::min(l, r0 + k - 1); ++tau) grad_pre(tau);
            for (int64_t t = r0; t < r1; ++t) {
                if (t + k - 1 < l) grad_pre(t + k - 1);
                // x[t] feeds pre[t + k-1-j] through w[j]
                for (int64_t d0 = 0; d0 < d; d0 += W) {
                    const int w = static_cast<int>(std::min<int64_t>(W, d - d0));
                    vf acc = splat(0.0f);
                    for (int64_t j = 0; j < k; ++j) {
                        const int64_t tau = t + (k - 1) - j;
                        if (tau < l) acc += load(wT + j * d + d0, w) * load(ring.data() + (tau % k) * d + d0, w);
                    }
                    store(gx + (bi * l + t) * d + d0, acc, w);
                }
            }
        }
    }
}

}  // extern "C"
