// Selective scan (Gu & Dao 2023, Alg. 2) forward and backward for the CPU:
//     h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t;   y_t = <h_t, C_t> + D * u_t
//
// Plain C++ behind an extern "C" interface, loaded with ctypes by kernels/scan_cpu.py: no torch
// headers, so it builds in a few seconds, where the same loops as an ATen extension took 80 s.
//
// Shapes (fp32 and contiguous, except where the forward says; see kernels/ref.py):
//     u, delta, y, gu, gdelta, gy   [b, l, d_in]
//     A, gA                         [d_in, n]
//     B, C                          [b, l, n]
//     D, gD                         [d_in]
//     h0, h_last, gh_last, gh0      [b, d_in, n]
//     ckpt                          [b, n_ck, d_in, n]   state before tokens 0, K, 2K, ...
//     gB_part, gC_part              [threads, b, l, n]   per-thread partial sums (no races)
//
// Work split: a block of W contiguous channels is the unit. Channels are the contiguous dimension
// of u/delta/y, so a timestep reads one cache line per tensor and block, and the innermost
// operations run over the W channels as one vector: no horizontal sums in the forward, and the
// block's state (n vectors) stays in L1. Each block is sequential over l; blocks run in parallel.
// A missing lane of a partial last block stays inert: delta = 0 gives decay 1 and input 0.
//
// The backward needs h_{t-1} at every step. The forward keeps the state every K tokens; the
// backward recomputes one K-token chunk at a time into a per-thread buffer ((K+1) x n x W floats
// per block) and walks it in reverse, so memory is O(l/K) states rather than O(l).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "simd.h"

namespace {

using namespace hybridlm;

#if defined(__AVX2__) && !defined(__AVX512F__)
// the state recurrence over i < n for the W = 16 channels of a block, as two 8-lane halves:
//     h[i] = exp(dl * A[i]) * h[i] + du * B[i];  y += h[i] * C[i]
inline vf state_step(vf* h, const vf* At, vf dl, vf du, const float* Bt, const float* Ct, vf y, int64_t n) {
    static_assert(W == 16, "two AVX2 halves per vector");
    __m256 dl2[2], du2[2], y2[2];
    std::memcpy(dl2, &dl, sizeof(dl));
    std::memcpy(du2, &du, sizeof(du));
    std::memcpy(y2, &y, sizeof(y));
    __m256* hh = reinterpret_cast<__m256*>(h);
    const __m256* aa = reinterpret_cast<const __m256*>(At);
    for (int64_t i = 0; i < n; ++i) {
        const __m256 b = _mm256_set1_ps(Bt[i]), c = _mm256_set1_ps(Ct[i]);
        for (int q = 0; q < 2; ++q) {
            const __m256 hv = _mm256_fmadd_ps(exp8(_mm256_mul_ps(dl2[q], aa[2 * i + q])), hh[2 * i + q],
                                              _mm256_mul_ps(du2[q], b));
            hh[2 * i + q] = hv;
            y2[q] = _mm256_fmadd_ps(hv, c, y2[q]);
        }
    }
    std::memcpy(&y, y2, sizeof(y));
    return y;
}

// the backward's recompute of one step: at[i] = exp(dl * A[i]), hn[i] = at[i] * hp[i] + du * B[i]
inline void recompute_step(vf* at, vf* hn, const vf* hp, const vf* Ak, vf dl, vf du, const float* Bt, int64_t n) {
    __m256 dl2[2], du2[2];
    std::memcpy(dl2, &dl, sizeof(dl));
    std::memcpy(du2, &du, sizeof(du));
    __m256 *a = reinterpret_cast<__m256*>(at), *hh = reinterpret_cast<__m256*>(hn);
    const __m256 *hq = reinterpret_cast<const __m256*>(hp), *ak = reinterpret_cast<const __m256*>(Ak);
    for (int64_t i = 0; i < n; ++i) {
        const __m256 b = _mm256_set1_ps(Bt[i]);
        for (int q = 0; q < 2; ++q) {
            const __m256 e = exp8(_mm256_mul_ps(dl2[q], ak[2 * i + q]));
            a[2 * i + q] = e;
            hh[2 * i + q] = _mm256_fmadd_ps(e, hq[2 * i + q], _mm256_mul_ps(du2[q], b));
        }
    }
}

// the backward's reverse step over i < n (see hybridlm_scan_bwd); gdu and gdd accumulate
inline void reverse_step(vf* ghk, vf* gAk, vf* sb, vf* sc, const vf* at, const vf* hp, const vf* hn, const vf* Ak,
                         vf dl, vf du, vf gyv, const float* Bt, const float* Ct, vf& gdu, vf& gdd, int64_t n) {
    __m256 dl2[2], du2[2], gy2[2], gu2[2], gd2[2];
    std::memcpy(dl2, &dl, sizeof(dl));
    std::memcpy(du2, &du, sizeof(du));
    std::memcpy(gy2, &gyv, sizeof(gyv));
    std::memcpy(gu2, &gdu, sizeof(gdu));
    std::memcpy(gd2, &gdd, sizeof(gdd));
    __m256 *gh = reinterpret_cast<__m256*>(ghk), *ga = reinterpret_cast<__m256*>(gAk);
    __m256 *b2 = reinterpret_cast<__m256*>(sb), *c2 = reinterpret_cast<__m256*>(sc);
    const __m256 *a = reinterpret_cast<const __m256*>(at), *hq = reinterpret_cast<const __m256*>(hp);
    const __m256 *hx = reinterpret_cast<const __m256*>(hn), *ak = reinterpret_cast<const __m256*>(Ak);
    for (int64_t i = 0; i < n; ++i) {
        const __m256 bt = _mm256_set1_ps(Bt[i]), ct = _mm256_set1_ps(Ct[i]);
        for (int q = 0; q < 2; ++q) {
            const int64_t j = 2 * i + q;
            const __m256 g = _mm256_fmadd_ps(gy2[q], ct, gh[j]);                  // dL/dh_t
            const __m256 gda = _mm256_mul_ps(_mm256_mul_ps(g, a[j]), hq[j]);      // dL/d(delta * A)
            c2[j] = _mm256_fmadd_ps(gy2[q], hx[j], c2[j]);
            b2[j] = _mm256_fmadd_ps(g, du2[q], b2[j]);
            gu2[q] = _mm256_fmadd_ps(g, bt, gu2[q]);
            ga[j] = _mm256_fmadd_ps(gda, dl2[q], ga[j]);
            gd2[q] = _mm256_fmadd_ps(gda, ak[j], gd2[q]);
            gh[j] = _mm256_mul_ps(g, a[j]);
        }
    }
    std::memcpy(&gdu, gu2, sizeof(gdu));
    std::memcpy(&gdd, gd2, sizeof(gdd));
}
#else
inline vf state_step(vf* h, const vf* At, vf dl, vf du, const float* Bt, const float* Ct, vf y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const vf hv = vexp(dl * At[i]) * h[i] + du * Bt[i];
        h[i] = hv;
        y += hv * Ct[i];
    }
    return y;
}

inline void recompute_step(vf* at, vf* hn, const vf* hp, const vf* Ak, vf dl, vf du, const float* Bt, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        at[i] = vexp(dl * Ak[i]);
        hn[i] = at[i] * hp[i] + du * Bt[i];
    }
}

inline void reverse_step(vf* ghk, vf* gAk, vf* sb, vf* sc, const vf* at, const vf* hp, const vf* hn, const vf* Ak,
                         vf dl, vf du, vf gyv, const float* Bt, const float* Ct, vf& gdu, vf& gdd, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const vf g = ghk[i] + gyv * Ct[i];     // dL/dh_t
        const vf gda = g * at[i] * hp[i];      // dL/d(delta * A)
        sc[i] += gyv * hn[i];
        sb[i] += g * du;
        gdu += g * Bt[i];
        gAk[i] += gda * dl;
        gdd += gda * Ak[i];
        ghk[i] = g * at[i];
    }
}
#endif

// [d, n] rows of channels d0..d0+w -> n vectors of W channels (the layout the loops use)
inline void gather_state(vf* dst, const float* src, int w, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        dst[i] = splat(0.0f);
        for (int j = 0; j < w; ++j) dst[i][j] = src[j * n + i];
    }
}

inline void scatter_state(float* dst, const vf* src, int w, int64_t n) {
    for (int j = 0; j < w; ++j)
        for (int64_t i = 0; i < n; ++i) dst[j * n + i] = src[i][j];
}

// The forward for u, delta, B, C, z and y of element type T (fp32 or bf16; the arithmetic is fp32).
// delta_bias (optional): delta <- softplus(delta + delta_bias) first, as Mamba's delta_softplus. z
// (optional, row stride ldz): y <- y * silu(z), Mamba's output gate. Both fuse what inference would
// otherwise do in separate passes over [b, l, d_in]; the training path (scan_cpu.py) passes neither.
template <typename T>
void scan_fwd(const T* u, const T* delta, const float* A, const T* B, const T* C, const float* D, const float* h0,
              const float* delta_bias, const T* z, int64_t ldz, T* y, float* h_last, float* ckpt, int64_t b,
              int64_t l, int64_t d_in, int64_t n, int64_t K, int threads) {
    const int64_t n_ck = (l + K - 1) / K, n_blocks = (d_in + W - 1) / W;
#pragma omp parallel num_threads(threads)
    {
        std::vector<vf> At(n), h(n);
        std::vector<float> bc(2 * n);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < b * n_blocks; ++item) {
            const int64_t bi = item / n_blocks, d0 = (item % n_blocks) * W;
            const int w = static_cast<int>(std::min<int64_t>(W, d_in - d0));
            gather_state(At.data(), A + d0 * n, w, n);
            if (h0) gather_state(h.data(), h0 + (bi * d_in + d0) * n, w, n);
            else std::fill(h.begin(), h.end(), splat(0.0f));
            const vf Dv = load(D + d0, w);
            const vf bias = delta_bias ? load(delta_bias + d0, w) : splat(0.0f);
            for (int64_t t = 0; t < l; ++t) {
                const int64_t row = (bi * l + t) * d_in + d0;
                if (ckpt && t % K == 0) scatter_state(ckpt + ((bi * n_ck + t / K) * d_in + d0) * n, h.data(), w, n);
                if (t + PF < l) {
                    prefetch(delta + row + PF * d_in);
                    prefetch(u + row + PF * d_in);
                    prefetch(y + row + PF * d_in, true);
                }
                vf dl = load(delta + row, w);
                if (delta_bias) dl = softplus(dl + bias);
                const vf ul = load(u + row, w), du = dl * ul;
                const float *Bt, *Ct;
                if constexpr (std::is_same_v<T, float>) {
                    Bt = B + (bi * l + t) * n;
                    Ct = C + (bi * l + t) * n;
                } else {                                       // this step's B and C rows as fp32
                    for (int64_t i = 0; i < n; ++i) {
                        bc[i] = bf2f(B[(bi * l + t) * n + i]);
                        bc[n + i] = bf2f(C[(bi * l + t) * n + i]);
                    }
                    Bt = bc.data();
                    Ct = bc.data() + n;
                }
                vf yacc = state_step(h.data(), At.data(), dl, du, Bt, Ct, Dv * ul, n);
                if (z) {
                    const vf zv = load(z + (bi * l + t) * ldz + d0, w);
                    yacc *= zv * sigmoid(zv);
                }
                store(y + row, yacc, w);
            }
            scatter_state(h_last + (bi * d_in + d0) * n, h.data(), w, n);
        }
    }
}

}  // namespace

extern "C" {

// u, delta, B, C, z, y: bf16 when `bf16` is set, else fp32; delta_bias and z may be null (see scan_fwd)
void hybridlm_scan_fwd(const void* u, const void* delta, const float* A, const void* B, const void* C,
                       const float* D, const float* h0, const float* delta_bias, const void* z, int64_t ldz, void* y,
                       float* h_last, float* ckpt, int bf16_io, int64_t b, int64_t l, int64_t d_in, int64_t n,
                       int64_t K, int threads) {
    if (bf16_io)
        scan_fwd(static_cast<const bf16*>(u), static_cast<const bf16*>(delta), A, static_cast<const bf16*>(B),
                 static_cast<const bf16*>(C), D, h0, delta_bias, static_cast<const bf16*>(z), ldz,
                 static_cast<bf16*>(y), h_last, ckpt, b, l, d_in, n, K, threads);
    else
        scan_fwd(static_cast<const float*>(u), static_cast<const float*>(delta), A, static_cast<const float*>(B),
                 static_cast<const float*>(C), D, h0, delta_bias, static_cast<const float*>(z), ldz,
                 static_cast<float*>(y), h_last, ckpt, b, l, d_in, n, K, threads);
}

// The backward's work item is a group of G consecutive blocks, all batch rows: gA and gD of a
// channel then have one writer, and the B/C gradients (sums over channels) are summed over the
// group's lanes in registers before one horizontal sum per (t, i) goes to the thread's partial.
// gh_last may be null (no gradient reached h_last). gB_part/gC_part must be zeroed by the caller.
void hybridlm_scan_bwd(const float* u, const float* delta, const float* A, const float* B, const float* C,
                       const float* D, const float* ckpt, const float* gy, const float* gh_last,
                       float* gu, float* gdelta, float* gA, float* gB_part, float* gC_part, float* gD,
                       float* gh0, int64_t b, int64_t l, int64_t d_in, int64_t n, int64_t K, int64_t G,
                       int threads) {
    const int64_t n_ck = (l + K - 1) / K, n_blocks = (d_in + W - 1) / W, n_groups = (n_blocks + G - 1) / G;
#pragma omp parallel num_threads(threads)
    {
        std::vector<vf> At(G * n), gh(G * n), gAacc(G * n), Dv(G), gDacc(G), sb(n), sc(n);
        std::vector<int> wk(G);
        // a chunk's states h_{t0-1}..h_{t1-1} and decays a_{t0}..a_{t1-1}, [t][block][i]
        std::vector<vf> hs((K + 1) * G * n), as(K * G * n);
        float* gBp = gB_part + omp_get_thread_num() * b * l * n;
        float* gCp = gC_part + omp_get_thread_num() * b * l * n;
#pragma omp for schedule(static)
        for (int64_t grp = 0; grp < n_groups; ++grp) {
            const int64_t blk0 = grp * G, nb = std::min(G, n_blocks - blk0), gn = nb * n;
            for (int64_t k = 0; k < nb; ++k) {
                const int64_t d0 = (blk0 + k) * W;
                wk[k] = static_cast<int>(std::min<int64_t>(W, d_in - d0));
                gather_state(&At[k * n], A + d0 * n, wk[k], n);
                Dv[k] = load(D + d0, wk[k]);
            }
            std::fill(gAacc.begin(), gAacc.end(), splat(0.0f));
            std::fill(gDacc.begin(), gDacc.end(), splat(0.0f));
            for (int64_t bi = 0; bi < b; ++bi) {
                for (int64_t k = 0; k < nb; ++k) {
                    const int64_t d0 = (blk0 + k) * W;
                    if (gh_last) gather_state(&gh[k * n], gh_last + (bi * d_in + d0) * n, wk[k], n);
                    else std::fill(&gh[k * n], &gh[k * n] + n, splat(0.0f));
                }
                for (int64_t c = n_ck - 1; c >= 0; --c) {
                    const int64_t t0 = c * K, t1 = std::min(l, t0 + K);
                    // recompute the chunk's states from its checkpoint
                    for (int64_t k = 0; k < nb; ++k) {
                        const int64_t d0 = (blk0 + k) * W;
                        gather_state(&hs[k * n], ckpt + ((bi * n_ck + c) * d_in + d0) * n, wk[k], n);
                    }
                    for (int64_t t = t0; t < t1; ++t) {
                        const float* Bt = B + (bi * l + t) * n;
                        for (int64_t k = 0; k < nb; ++k) {
                            const int64_t row = (bi * l + t) * d_in + (blk0 + k) * W;
                            if (t + PF < t1) {
                                prefetch(delta + row + PF * d_in);
                                prefetch(u + row + PF * d_in);
                            }
                            const vf dl = load(delta + row, wk[k]), du = dl * load(u + row, wk[k]);
                            const vf* hp = &hs[(t - t0) * gn + k * n];
                            vf* hn = &hs[(t - t0 + 1) * gn + k * n];
                            vf* at = &as[(t - t0) * gn + k * n];
                            const vf* Ak = &At[k * n];
                            recompute_step(at, hn, hp, Ak, dl, du, Bt, n);
                        }
                    }
                    // reverse walk; gh holds dL/dh_t from the future (a_{t+1} * g_{t+1}, or gh_last)
                    for (int64_t t = t1 - 1; t >= t0; --t) {
                        const float* Bt = B + (bi * l + t) * n;
                        const float* Ct = C + (bi * l + t) * n;
                        std::fill(sb.begin(), sb.end(), splat(0.0f));
                        std::fill(sc.begin(), sc.end(), splat(0.0f));
                        for (int64_t k = 0; k < nb; ++k) {
                            const int w = wk[k];
                            const int64_t row = (bi * l + t) * d_in + (blk0 + k) * W;
                            if (t - PF >= 0) {
                                prefetch(gy + row - PF * d_in);
                                prefetch(gu + row - PF * d_in, true);
                                prefetch(gdelta + row - PF * d_in, true);
                            }
                            const vf dl = load(delta + row, w), ul = load(u + row, w), gyv = load(gy + row, w);
                            const vf du = dl * ul;
                            vf gdu = splat(0.0f), gdd = splat(0.0f);
                            const vf* hp = &hs[(t - t0) * gn + k * n];
                            const vf* hn = &hs[(t - t0 + 1) * gn + k * n];
                            const vf* at = &as[(t - t0) * gn + k * n];
                            const vf* Ak = &At[k * n];
                            vf* ghk = &gh[k * n];
                            vf* gAk = &gAacc[k * n];
                            reverse_step(ghk, gAk, sb.data(), sc.data(), at, hp, hn, Ak, dl, du, gyv, Bt, Ct, gdu, gdd, n);
                            store(gu + row, gdu * dl + gyv * Dv[k], w);
                            store(gdelta + row, gdu * ul + gdd, w);
                            gDacc[k] += gyv * ul;
                        }
                        float* gBt = gBp + (bi * l + t) * n;
                        float* gCt = gCp + (bi * l + t) * n;
                        for (int64_t i = 0; i < n; ++i) {
                            gBt[i] += hsum(sb[i]);
                            gCt[i] += hsum(sc[i]);
                        }
                    }
                }
                for (int64_t k = 0; k < nb; ++k)
                    if (gh0) scatter_state(gh0 + (bi * d_in + (blk0 + k) * W) * n, &gh[k * n], wk[k], n);
            }
            for (int64_t k = 0; k < nb; ++k) {
                const int64_t d0 = (blk0 + k) * W;
                scatter_state(gA + d0 * n, &gAacc[k * n], wk[k], n);
                store(gD + d0, gDacc[k], wk[k]);
            }
        }
    }
}

}  // extern "C"
