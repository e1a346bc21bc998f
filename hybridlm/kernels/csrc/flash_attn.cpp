// Causal attention of a prefill chunk over the cache (flash attention, Dao et al. 2022) for bf16 on CPUs
// with AVX512-BF16: both products, Q K^T and P V, on vdpbf16ps (32 bf16 multiply-adds into fp32 per
// instruction), the softmax online in fp32 per key block, so no [queries, keys] matrix exists.
//
// Shapes (bf16; strides in elements, the last dimension contiguous):
//     q     [b, h, l, dh]        queries of slots start .. start+l-1
//     k, v  [b, h_kv, s, dh]     keys/values of slots 0 .. s-1
//     out   [b, h, l, dh]        contiguous
//     valid [b, s] bytes (1 = a real token) with row stride valid_stride, or null
// Query at slot p sees key slot j when j <= p and valid[j]; a query that sees no key (a padded query)
// attends to itself, as the torch path does. Query head hi reads kv head hi / (h / h_kv).
//
// Layout: the g query heads of a kv head share its keys, so a work item is QB queries x g heads of one
// (row, kv head): M = QB * g query rows against the same packed keys. K and V are packed once per call
// into the pair layouts vdpbf16ps reads: K as [dh/2][KB] 32-bit pairs of dims (16 keys per vector), V
// as [KB/2][dh] pairs of consecutive keys (16 dims per vector).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "simd.h"

#ifdef __AVX512BF16__
namespace {

using namespace hybridlm;

constexpr int64_t KB = 64;   // keys per block
constexpr int64_t QB = 16;   // queries per work item (times g heads = rows)

inline uint32_t pair(bf16 lo, bf16 hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); }

// S[r, 0:KB] = Q[r] . K[block] for R rows: 4 vectors of 16 keys per row, dh/2 pair steps
template <int R>
inline void scores(const uint32_t* Qp, int64_t pairs, const uint32_t* Kp, float* S) {
    __m512 acc[R][KB / 16];
    for (int r = 0; r < R; ++r)
        for (int g = 0; g < KB / 16; ++g) acc[r][g] = _mm512_setzero_ps();
    for (int64_t c = 0; c < pairs; ++c) {
        __m512bh kv[KB / 16];
        for (int g = 0; g < KB / 16; ++g) kv[g] = (__m512bh)_mm512_loadu_si512(Kp + c * KB + g * 16);
        for (int r = 0; r < R; ++r) {
            const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(Qp[r * pairs + c]));
            for (int g = 0; g < KB / 16; ++g) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], kv[g], qb);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int g = 0; g < KB / 16; ++g) _mm512_storeu_ps(S + r * KB + g * 16, acc[r][g]);
}

// O[r, :] += P[r, 0:KB] V[block] for R rows, DV vectors of 16 dims; P as KB/2 key pairs per row
template <int R, int DV>
inline void weighted(const uint32_t* Pp, const uint32_t* Vp, float* O) {
    __m512 acc[R][DV];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < DV; ++v) acc[r][v] = _mm512_loadu_ps(O + r * DV * 16 + v * 16);
    for (int64_t c = 0; c < KB / 2; ++c) {
        __m512bh vv[DV];
        for (int v = 0; v < DV; ++v) vv[v] = (__m512bh)_mm512_loadu_si512(Vp + c * DV * 16 + v * 16);
        for (int r = 0; r < R; ++r) {
            const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(Pp[r * (KB / 2) + c]));
            for (int v = 0; v < DV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], vv[v], pb);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < DV; ++v) _mm512_storeu_ps(O + r * DV * 16 + v * 16, acc[r][v]);
}

template <int DV>
void weighted_rows(const uint32_t* Pp, const uint32_t* Vp, float* O, int64_t M) {
    constexpr int R = DV <= 4 ? 4 : 2;   // R * DV accumulators + DV values <= 32 registers
    int64_t r = 0;
    for (; r + R <= M; r += R) weighted<R, DV>(Pp + r * (KB / 2), Vp, O + r * DV * 16);
    for (; r < M; ++r) weighted<1, DV>(Pp + r * (KB / 2), Vp, O + r * DV * 16);
}

void weighted_any(const uint32_t* Pp, const uint32_t* Vp, float* O, int64_t M, int64_t dv) {
    switch (dv) {
        case 1: weighted_rows<1>(Pp, Vp, O, M); break;
        case 2: weighted_rows<2>(Pp, Vp, O, M); break;
        case 4: weighted_rows<4>(Pp, Vp, O, M); break;
        default: weighted_rows<8>(Pp, Vp, O, M); break;
    }
}

}  // namespace
#endif

extern "C" {

int hybridlm_has_flash_attn() {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

// 0 on success; 1 when this build has no AVX512-BF16 kernel (the caller runs torch's SDPA), 2 for a
// head size it does not handle (dh must be 16, 32, 64 or 128)
int hybridlm_flash_attn(const void* q_, int64_t q_sb, int64_t q_sh, int64_t q_sl, const void* k_, const void* v_,
                        int64_t kv_sb, int64_t kv_sh, int64_t kv_ss, void* out_, const uint8_t* valid,
                        int64_t valid_stride, int64_t b, int64_t h, int64_t h_kv, int64_t l, int64_t s, int64_t dh,
                        int64_t start, float scale, int threads) {
#ifndef __AVX512BF16__
    (void)q_, (void)q_sb, (void)q_sh, (void)q_sl, (void)k_, (void)v_, (void)kv_sb, (void)kv_sh, (void)kv_ss;
    (void)out_, (void)valid, (void)valid_stride, (void)b, (void)h, (void)h_kv, (void)l, (void)s, (void)dh;
    (void)start, (void)scale, (void)threads;
    return 1;
#else
    if (dh != 16 && dh != 32 && dh != 64 && dh != 128) return 2;
    const bf16* q = static_cast<const bf16*>(q_);
    const bf16* k = static_cast<const bf16*>(k_);
    const bf16* v = static_cast<const bf16*>(v_);
    bf16* out = static_cast<bf16*>(out_);
    const int64_t g = h / h_kv, pairs = dh / 2, dv = dh / 16, nkb = (s + KB - 1) / KB, nqb = (l + QB - 1) / QB;
    const int64_t blk = KB * dh;   // bf16 values per packed key block (blk / 2 32-bit pairs)
    // packed K [b, h_kv, nkb, pairs, KB] and V [b, h_kv, nkb, KB/2, dh], 32-bit bf16 pairs, zero-padded
    std::vector<uint32_t> Kp(b * h_kv * nkb * blk / 2), Vp(b * h_kv * nkb * blk / 2);
    // whole[bi * nkb + kb]: block kb of row bi holds KB real keys (no padding, not past s): no mask needed
    std::vector<uint8_t> whole(b * nkb);
    for (int64_t bi = 0; bi < b; ++bi)
        for (int64_t kb = 0; kb < nkb; ++kb) {
            bool all = (kb + 1) * KB <= s;
            for (int64_t j = kb * KB; all && valid && j < (kb + 1) * KB; ++j) all = valid[bi * valid_stride + j];
            whole[bi * nkb + kb] = all;
        }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t it = 0; it < b * h_kv * nkb; ++it) {
            const int64_t bi = it / (h_kv * nkb), kh = it / nkb % h_kv, kb = it % nkb;
            const bf16* kr = k + bi * kv_sb + kh * kv_sh;
            const bf16* vr = v + bi * kv_sb + kh * kv_sh;
            uint32_t* kp = Kp.data() + it * blk / 2;
            uint32_t* vp = Vp.data() + it * blk / 2;
            for (int64_t j = 0; j < KB; ++j) {
                const int64_t key = kb * KB + j;
                for (int64_t c = 0; c < pairs; ++c)
                    kp[c * KB + j] = key < s ? pair(kr[key * kv_ss + 2 * c], kr[key * kv_ss + 2 * c + 1]) : 0;
            }
            for (int64_t j = 0; j < KB / 2; ++j) {
                const int64_t k0 = kb * KB + 2 * j;
                for (int64_t d = 0; d < dh; ++d)
                    vp[j * dh + d] = pair(k0 < s ? vr[k0 * kv_ss + d] : 0, k0 + 1 < s ? vr[(k0 + 1) * kv_ss + d] : 0);
            }
        }
        const int64_t M = QB * g;
        std::vector<uint32_t> Qp(M * pairs), Pp(M * KB / 2);
        std::vector<float> S(M * KB), O(M * dh), mx(M), sum(M);
        std::vector<int64_t> pos(M);
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < b * h_kv * nqb; ++it) {
            // later query blocks see more keys: schedule them first
            const int64_t rev = b * h_kv * nqb - 1 - it;
            const int64_t bi = rev / (h_kv * nqb), kh = rev / nqb % h_kv, qb = rev % nqb;
            const int64_t q0 = qb * QB, nq = std::min(QB, l - q0), rows = nq * g;
            const uint8_t* ok = valid ? valid + bi * valid_stride : nullptr;
            for (int64_t j = 0; j < g; ++j)                       // row j * nq + i: head kh*g+j, query q0+i
                for (int64_t i = 0; i < nq; ++i) {
                    const bf16* qr = q + bi * q_sb + (kh * g + j) * q_sh + (q0 + i) * q_sl;
                    const int64_t r = j * nq + i;
                    for (int64_t c = 0; c < pairs; ++c) Qp[r * pairs + c] = pair(qr[2 * c], qr[2 * c + 1]);
                    pos[r] = start + q0 + i;
                }
            std::fill(O.begin(), O.begin() + rows * dh, 0.0f);
            std::fill(mx.begin(), mx.begin() + rows, -INFINITY);
            std::fill(sum.begin(), sum.begin() + rows, 0.0f);
            const int64_t last = std::min(s - 1, start + q0 + nq - 1);   // the last key any row can see
            const uint32_t* kbase = Kp.data() + (bi * h_kv + kh) * nkb * blk / 2;
            const uint32_t* vbase = Vp.data() + (bi * h_kv + kh) * nkb * blk / 2;
            for (int64_t kb = 0; kb * KB <= last; ++kb) {
                const int64_t j0 = kb * KB;
                int64_t r = 0;
                for (; r + 4 <= rows; r += 4) scores<4>(Qp.data() + r * pairs, pairs, kbase + kb * blk / 2, S.data() + r * KB);
                for (; r < rows; ++r) scores<1>(Qp.data() + r * pairs, pairs, kbase + kb * blk / 2, S.data() + r * KB);
                const bool full = whole[bi * nkb + kb] && j0 + KB - 1 <= start + q0;   // every row sees every key
                for (r = 0; r < rows; ++r) {
                    float* sr = S.data() + r * KB;
                    vf m = splat(-INFINITY);
                    for (int64_t t = 0; t < KB; t += W) {
                        vf x = load(sr + t, W) * scale;
                        if (!full)
                            for (int e = 0; e < W; ++e) {
                                const int64_t key = j0 + t + e;
                                if (key > pos[r] || key >= s || (ok && !ok[key])) x[e] = -INFINITY;
                            }
                        store(sr + t, x, W);
                        m = x > m ? x : m;
                    }
                    float mb = mx[r];
                    for (int e = 0; e < W; ++e) mb = std::max(mb, m[e]);
                    uint32_t* pr = Pp.data() + r * (KB / 2);
                    if (mb == -INFINITY) {                                    // nothing visible yet
                        std::memset(pr, 0, KB / 2 * sizeof(uint32_t));
                        continue;
                    }
                    const float corr = std::exp(mx[r] - mb);                   // 0 when mx was -inf
                    mx[r] = mb;
                    vf ls = splat(0.0f);
                    for (int64_t t = 0; t < KB; t += W) {
                        const vf p = vexp(load(sr + t, W) - mb);
                        ls += p;
                        store(reinterpret_cast<bf16*>(pr) + t, p, W);
                    }
                    sum[r] = sum[r] * corr + hsum(ls);
                    if (corr != 1.0f)
                        for (int64_t d = 0; d < dh; d += W) store(O.data() + r * dh + d, load(O.data() + r * dh + d, W) * corr, W);
                }
                weighted_any(Pp.data(), vbase + kb * blk / 2, O.data(), rows, dv);
            }
            for (int64_t r = 0; r < rows; ++r) {
                const int64_t j = r / nq, i = r % nq;
                bf16* orow = out + ((bi * h + kh * g + j) * l + q0 + i) * dh;
                if (sum[r] > 0.0f) {
                    const float inv = 1.0f / sum[r];
                    for (int64_t d = 0; d < dh; d += W) store(orow + d, load(O.data() + r * dh + d, W) * inv, W);
                } else {                                                       // sees no key: itself
                    const bf16* own = v + bi * kv_sb + kh * kv_sh + std::min(pos[r], s - 1) * kv_ss;
                    std::memcpy(orow, own, dh * sizeof(bf16));
                }
            }
        }
    }
    return 0;
#endif
}

}  // extern "C"
