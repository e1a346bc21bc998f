// One-token (decode) kernels: matrix-vector products that stream the weights once, and the whole
// Mamba mixer step and SwiGLU MLP each fused into one call.
//
// A decode step of a small model is bound by two things: reading every active weight once from
// memory, and the per-op overhead of dozens of small torch calls per layer. These kernels do a
// layer's work in one call with fp32 arithmetic throughout (more exact than the op-by-op path,
// which rounds to the model dtype between ops), reading fp32, bf16, int8 or int4 weights (mat.h);
// quantized weights multiply int8-quantized activations (gemv_q).
//
// Shapes (b = rows being decoded, small):
//     x, out          [b, d]           activations, fp32 or bf16 (act_bf16)
//     weights         [out, in]        nn.Linear's layout, passed as a Mat (mat.h): fp32, bf16, int8, int4
//     small params    fp32, contiguous (the Python side keeps fp32 copies)
//     conv_state      [b, d_in, k-1]   fp32 or bf16 (state_bf16), updated in place
//     ssm             [b, d_in, n]     fp32, updated in place
//
// Work is split across threads by output rows (matrix-vector products) or channels (conv, scan),
// with barriers between the phases of a layer.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <omp.h>
#if defined(__AVX512BF16__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "mat.h"
#include "simd.h"

// u8 x s8 dot products of 4 bytes into int32 lanes, in one instruction (tile_dot; int_dot_path())
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HYBRIDLM_DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#define HYBRIDLM_INT_DOT 3
#elif defined(__AVXVNNI__)
#define HYBRIDLM_DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#define HYBRIDLM_INT_DOT 2
#elif defined(__AVX2__)
#define HYBRIDLM_INT_DOT 1
#else
#define HYBRIDLM_INT_DOT 0
#endif
// int4 products on 512-bit registers (two sub-blocks per instruction; tile_dot, spread_x)
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HYBRIDLM_I4_ZMM 1
#else
#define HYBRIDLM_I4_ZMM 0
#endif

extern "C" void hybridlm_rmsnorm(const void* x, void* out, int act_bf16, const void* weight, int w_bf16, float eps,
                                 int64_t rows, int64_t d, int threads);   // elementwise.cpp

namespace {

using namespace hybridlm;

inline void put(void* p, int64_t i, float v, bool is_bf16) {
    if (is_bf16) static_cast<bf16*>(p)[i] = f2bf(v);
    else static_cast<float*>(p)[i] = v;
}

// n activations (fp32 or bf16) as an fp32 copy
inline std::vector<float> load_act(const void* x, int64_t n, bool is_bf16) {
    std::vector<float> xf(n);
    for (int64_t i = 0; i < n; ++i) xf[i] = get(x, i, is_bf16);
    return xf;
}

// out[bi, c] = src[bi, c] (rounded to out's dtype) for the b rows and the columns [c0, c1) of [b, ld]
inline void store_cols(void* out, const float* src, int64_t b, int64_t ld, int64_t c0, int64_t c1, bool is_bf16) {
    for (int64_t bi = 0; bi < b; ++bi)
        for (int64_t c = c0; c < c1; ++c) put(out, bi * ld + c, src[bi * ld + c], is_bf16);
}

// w (<= W) consecutive values at p[i..] of an fp32 or bf16 array, as fp32 lanes (missing lanes 0)
inline vf loadv(const void* p, int64_t i, bool is_bf16, int w) {
    return is_bf16 ? load(static_cast<const bf16*>(p) + i, w) : load(static_cast<const float*>(p) + i, w);
}

// r[t] = the sum of the lanes of v[t], for W vectors: halving by shuffles across pairs of vectors
// (15 shuffle-add pairs in all, where W separate horizontal sums take ~4 each)
inline vf hsum16(const vf* v) {
    static_assert(W == 16, "hsum16 is written for 16 lanes");
    vf a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i)
        a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; ++i)
        b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; ++i)
        c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

inline float sigmoidf(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// One channel's causal conv step + SiLU: the window conv_state[s0 .. s0 + k - 1) (oldest first, fp32 or bf16)
// shifts left and takes xin; returns silu(conv_b + the window and xin times conv_w [k]).
inline float conv_step(void* conv_state, bool s16, int64_t s0, const float* w, float bias, float xin, int64_t k) {
    float acc = bias + xin * w[k - 1];
    for (int64_t j = 0; j < k - 1; ++j) acc += get(conv_state, s0 + j, s16) * w[j];
    for (int64_t j = 0; j + 1 < k - 1; ++j) put(conv_state, s0 + j, get(conv_state, s0 + j + 1, s16), s16);
    if (k > 1) put(conv_state, s0 + k - 2, xin, s16);
    return acc * sigmoidf(acc);
}

// One channel's state step over its n states (a decode step):
//     h[j] = a_j * h[j] + du * B[j],  a_j = exp(delta * A[j]) (Mamba-1: A a row of [d_in, n]) or `decay`
//     (Mamba-2: A null, one decay per head); returns sum_j h[j] * C[j]. On AVX2 without AVX-512, 8 lanes
//     at a time (simd.h's exp8).
inline float state_row(float* h, const float* A, float delta, float decay, float du, const float* Bv, const float* Cv,
                       int64_t n) {
    int64_t j = 0;
    float y = 0.0f;
#if defined(__AVX2__) && !defined(__AVX512F__)
    const __m256 dv = _mm256_set1_ps(delta), dc = _mm256_set1_ps(decay), uv = _mm256_set1_ps(du);
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
        const __m256 e = A ? exp8(_mm256_mul_ps(_mm256_loadu_ps(A + j), dv)) : dc;
        const __m256 hv = _mm256_fmadd_ps(e, _mm256_loadu_ps(h + j), _mm256_mul_ps(_mm256_loadu_ps(Bv + j), uv));
        _mm256_storeu_ps(h + j, hv);
        acc = _mm256_fmadd_ps(hv, _mm256_loadu_ps(Cv + j), acc);
    }
    y = hsum_avx2(acc);
    for (; j < n; ++j) {
        const float hv = (A ? std::exp(A[j] * delta) : decay) * h[j] + Bv[j] * du;
        h[j] = hv;
        y += hv * Cv[j];
    }
#else
    vf yv = splat(0.0f);
    for (; j < n; j += W) {
        const int w = static_cast<int>(std::min<int64_t>(W, n - j));
        const vf e = A ? vexp(load(A + j, w) * delta) : splat(decay);
        const vf hv = e * load(h + j, w) + load(Bv + j, w) * du;
        store(h + j, hv, w);
        yv += hv * load(Cv + j, w);
    }
    y = hsum(yv);
#endif
    return y;
}

// [r0, r1) of n items for thread t of nt, in multiples of `align`
inline void split(int64_t n, int t, int nt, int64_t align, int64_t& r0, int64_t& r1) {
    const int64_t blocks = (n + align - 1) / align;
    r0 = std::min(n, blocks * t / nt * align);
    r1 = std::min(n, blocks * (t + 1) / nt * align);
}

void mamba_tokens(const void* x, void* out, int act_bf16, const Mat* w_in, const Mat* w_x, const Mat* w_dt,
                  const Mat* w_out, const float* in_bias, const float* out_bias, const float* conv_w,
                  const float* conv_b, const float* dt_ln, const float* b_ln, const float* c_ln, float eps,
                  const float* dt_bias, const float* A, const float* Dp, void* conv_state, int state_bf16, float* ssm,
                  int64_t rows, int64_t tokens, float* trail_u, float* trail_ssm, int64_t d, int64_t d_in, int64_t n,
                  int64_t r, int64_t k, int threads);

constexpr int RB = 8;   // split rows between threads in multiples of this (a quantized tile's rows)
constexpr int BB = 4;   // batch rows per pass over a quantized weight row
constexpr int BF = 8;   // batch rows per pass over an fp32/bf16 weight row (a speculative verify chunk's 8)
constexpr int64_t X_TILE_BYTES = 96 * 1024;   // quantized x rows kept in L2 per pass over the weights
// how far ahead (bytes) tile_dot prefetches the weight stream, into L2 (prefetcht1). Sapphire Rapids, 3B
// shapes, 2 threads: without a prefetch the int4 g32 product read 69% of the memory bandwidth; 2 KiB ahead
// into L1 (prefetcht0) 84-90% for g32 but 58-67% for g64/g128 (whose scale stream is sparser), and a
// prefetch of the scales into L1 as well slowed g32 down to g64's speed (likely L1's few miss buffers).
// Into L2, 4 KiB ahead: int8 95%, int4 g32/g64/g128 84-87% (1 KiB ahead: 72-77%).
constexpr int64_t PREFETCH_AHEAD = 4096;

// s[j] = dot(wr[:k], x[j*k : (j+1)*k]) for NB batch rows; NB * CH independent accumulator chains
template <typename T, int NB>
inline void row_dot(const T* wr, const float* x, int64_t k, float* s) {
    constexpr int CH = NB >= 4 ? 1 : 4 / NB;
    vf acc[NB][CH];
    for (int j = 0; j < NB; ++j)
        for (int q = 0; q < CH; ++q) acc[j][q] = splat(0.0f);
    const int64_t kc = k / (CH * W) * (CH * W), kv = k / W * W;
    int64_t c = 0;
    for (; c < kc; c += CH * W)
        for (int q = 0; q < CH; ++q) {
            const vf wv = load(wr + c + q * W, W);
            for (int j = 0; j < NB; ++j) acc[j][q] += wv * load(x + j * k + c + q * W, W);
        }
    for (; c < kv; c += W) {
        const vf wv = load(wr + c, W);
        for (int j = 0; j < NB; ++j) acc[j][0] += wv * load(x + j * k + c, W);
    }
    for (int j = 0; j < NB; ++j) {
        vf t = acc[j][0];
        for (int q = 1; q < CH; ++q) t += acc[j][q];
        s[j] = hsum(t);
        for (int64_t i = kv; i < k; ++i) s[j] += get(wr, i, sizeof(T) == 2) * x[j * k + i];
    }
}

#ifdef __AVX2__
// fp32 or bf16 weights on AVX2 (without AVX512-BF16): 8 weights per register (bf16 widened by a zero-extend
// and a shift), 8 accumulator chains (an FMA's latency of 4 on 2 ports). The 16-lane vector type of row_dot
// spills to the stack here: one row of a 1280 x 320 fp32 weight took 177 us against torch's 58 us (this
// loop: 60 us), bf16 from memory ~2x slower.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

template <typename T, int NB>
inline void row_dot_avx2(const T* wr, const float* x, int64_t k, float* s) {
    constexpr int CH = NB >= 8 ? 1 : 8 / NB;
    __m256 acc[NB][CH];
    for (int j = 0; j < NB; ++j)
        for (int q = 0; q < CH; ++q) acc[j][q] = _mm256_setzero_ps();
    const int64_t kv = k / (8 * CH) * (8 * CH);
    for (int64_t c = 0; c < kv; c += 8 * CH)
        for (int q = 0; q < CH; ++q) {
            const __m256 wv = load8(wr + c + 8 * q);
            for (int j = 0; j < NB; ++j) acc[j][q] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + j * k + c + 8 * q), acc[j][q]);
        }
    for (int j = 0; j < NB; ++j) {
        __m256 t = acc[j][0];
        for (int q = 1; q < CH; ++q) t = _mm256_add_ps(t, acc[j][q]);
        s[j] = hsum_avx2(t);
        for (int64_t i = kv; i < k; ++i) s[j] += get(wr, i, std::is_same_v<T, bf16>) * x[j * k + i];
    }
}
#endif

#ifdef __AVX512BF16__
// bf16 weights on a CPU with AVX512-BF16: x rounded to bf16 (as a bf16 matmul rounds its input) once per
// product, by bf16_rows, and vdpbf16ps multiplies 32 pairs into fp32 sums, with no widening of the
// weights (rounding x once instead of once per weight row measured 5-10% faster from memory, 2x from
// cache). xh: x rounded, [NB, k]; x: the fp32 values, for the last k % 32 columns.
template <int NB>
inline void row_dot_bf16(const bf16* wr, const bf16* xh, const float* x, int64_t k, float* s) {
    constexpr int CH = NB >= 4 ? 1 : 4 / NB;
    constexpr int V = 32;
    __m512 acc[NB][CH];
    for (int j = 0; j < NB; ++j)
        for (int q = 0; q < CH; ++q) acc[j][q] = _mm512_setzero_ps();
    const int64_t kc = k / (CH * V) * (CH * V), kv = k / V * V;
    auto step = [&](int64_t c, int q) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + c);
        for (int j = 0; j < NB; ++j)
            acc[j][q] = _mm512_dpbf16_ps(acc[j][q], wv, (__m512bh)_mm512_loadu_si512(xh + j * k + c));
    };
    int64_t c = 0;
    for (; c < kc; c += CH * V)
        for (int q = 0; q < CH; ++q) step(c + q * V, q);
    for (; c < kv; c += V) step(c, 0);
    for (int j = 0; j < NB; ++j) {
        __m512 t = acc[j][0];
        for (int q = 1; q < CH; ++q) t = _mm512_add_ps(t, acc[j][q]);
        s[j] = _mm512_reduce_add_ps(t);
        for (int64_t i = kv; i < k; ++i) s[j] += bf2f(wr[i]) * x[j * k + i];
    }
}

template <int NB>
inline void row_dot_any(const bf16* wr, const bf16* xh, const float* x, int64_t k, float* s) {
    row_dot_bf16<NB>(wr, xh, x, k, s);
}

// x [nb, k] as row_dot_bf16 reads it: each row's full 32-value blocks rounded as vcvtne2ps2bf16 rounds
inline const bf16* bf16_rows(const float* x, int64_t nb, int64_t k, std::vector<bf16>& buf) {
    buf.resize(nb * k);
    for (int64_t j = 0; j < nb; ++j)
        for (int64_t c = 0; c + 32 <= k; c += 32)
            _mm512_storeu_si512(buf.data() + j * k + c,
                                (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + j * k + c + 16), _mm512_loadu_ps(x + j * k + c)));
    return buf.data();
}
#else
template <int NB>
inline void row_dot_any(const bf16* wr, const bf16*, const float* x, int64_t k, float* s) {
#ifdef __AVX2__
    row_dot_avx2<bf16, NB>(wr, x, k, s);
#else
    row_dot<bf16, NB>(wr, x, k, s);
#endif
}

// without AVX512-BF16 the dots widen the weights and read x in fp32: nothing to prepare
inline const bf16* bf16_rows(const float*, int64_t, int64_t, std::vector<bf16>&) { return nullptr; }
#endif

template <int NB>
inline void row_dot_any(const float* wr, const bf16*, const float* x, int64_t k, float* s) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    row_dot_avx2<float, NB>(wr, x, k, s);
#else
    row_dot<float, NB>(wr, x, k, s);
#endif
}

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
#define HYBRIDLM_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

// bf16 weights times several rows of x on AMX tiles (Sapphire Rapids and later): a speculative verify chunk
// or a batch. One tdpbf16ps multiplies 16 weight rows x 32 columns (tile A, loaded straight from w with
// a row stride of k) by 32 columns x nb rows of x (tile B: x rounded to bf16, packed in pairs of columns)
// into 16 x nb fp32 sums (tile C). Four C tiles (64 weight rows) share each B tile. The row_dot_bf16 loop
// spends as many instructions reducing its nb accumulators as multiplying when k is a few hundred: on the
// 25M model's shapes a verify chunk of 8 tokens ran its products ~3x slower than this (see AMX_MIN_ROWS).
constexpr int64_t AMX_MIN_ROWS = 2;   // batch rows from which tiles beat row_dot_bf16 (one row: row_dot)

struct TileConfig {           // the LDTILECFG operand, palette 1
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// The kernel may use tiles only once the OS has granted this process the AMX state (Linux >= 5.16)
inline bool amx_granted() {
    static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return ok;
}
int amx_off = 0;   // hybridlm_amx_tiles(1): tests and benchmarks time row_dot_bf16 on the same CPU

// Rows [r0, r1) of out[bi, r] (+ bias) for nb <= 16 rows of x (xh: x rounded to bf16 [nb, k], full 32-column
// blocks; x: fp32, for the last k % 32 columns), in blocks of 16 weight rows; returns the first row left
// (fewer than 16 remain).
int64_t gemv_rows_amx(const bf16* w, const float* bias, const bf16* xh, const float* x, float* out, int64_t ldo,
                      int64_t nb, int64_t k, int64_t r0, int64_t r1) {
    const int64_t kf = k / 32 * 32, wstride = k * 2, bstride = nb * 4;
    thread_local std::vector<uint32_t> bp;    // B: [kf / 2, nb] pairs (x[n, 2p], x[n, 2p + 1])
    bp.resize(kf / 2 * nb);
    for (int64_t n = 0; n < nb; ++n) {
        const uint32_t* xr = reinterpret_cast<const uint32_t*>(xh + n * k);
        for (int64_t p = 0; p < kf / 2; ++p) bp[p * nb + n] = xr[p];
    }
    TileConfig cfg;
    for (int t = 0; t < 4; ++t) cfg.rows[t] = 16, cfg.colsb[t] = static_cast<uint16_t>(bstride);   // C
    for (int t = 4; t < 6; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;                               // A
    cfg.rows[6] = 16, cfg.colsb[6] = static_cast<uint16_t>(bstride);                              // B
    _tile_loadconfig(&cfg);
    alignas(64) float c[4][16 * 16];
    auto emit = [&](int64_t r, int blocks) {
        for (int q = 0; q < blocks; ++q)
            for (int64_t m = 0; m < 16; ++m) {
                const int64_t row = r + 16 * q + m;
                const bf16* wr = w + row * k;
                for (int64_t n = 0; n < nb; ++n) {
                    float v = c[q][m * nb + n] + (bias ? bias[row] : 0.0f);
                    for (int64_t i = kf; i < k; ++i) v += bf2f(wr[i]) * x[n * k + i];
                    out[n * ldo + row] = v;
                }
            }
    };
    int64_t r = r0;
    for (; r + 64 <= r1; r += 64) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        const bf16* wr = w + r * k;
        for (int64_t kk = 0; kk < kf; kk += 32) {
            _tile_loadd(6, bp.data() + kk / 2 * nb, bstride);
            _tile_loadd(4, wr + kk, wstride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(5, wr + 16 * k + kk, wstride);
            _tile_dpbf16ps(1, 5, 6);
            _tile_loadd(4, wr + 32 * k + kk, wstride);
            _tile_dpbf16ps(2, 4, 6);
            _tile_loadd(5, wr + 48 * k + kk, wstride);
            _tile_dpbf16ps(3, 5, 6);
        }
        _tile_stored(0, c[0], bstride); _tile_stored(1, c[1], bstride);
        _tile_stored(2, c[2], bstride); _tile_stored(3, c[3], bstride);
        emit(r, 4);
    }
    for (; r + 16 <= r1; r += 16) {
        _tile_zero(0);
        for (int64_t kk = 0; kk < kf; kk += 32) {
            _tile_loadd(6, bp.data() + kk / 2 * nb, bstride);
            _tile_loadd(4, w + r * k + kk, wstride);
            _tile_dpbf16ps(0, 4, 6);
        }
        _tile_stored(0, c[0], bstride);
        emit(r, 1);
    }
    _tile_release();
    return r;
}
#else
#define HYBRIDLM_AMX 0
#endif

// out[bi, r] = dot(w[r, :k], x[bi, :k]) (+ bias[r]) for rows r in [r0, r1); x fp32 [b, k]; out fp32 with
// row stride ldo. The weights are read once, in memory order (measured 1.5x faster than interleaving
// several rows: the hardware prefetcher follows one stream best).
template <typename T>
void gemv_rows(const T* w, const float* bias, const float* x, float* out, int64_t ldo, int64_t b, int64_t k,
               int64_t r0, int64_t r1) {
    float s[BF];
    thread_local std::vector<bf16> buf;
    const bf16* xh = std::is_same_v<T, bf16> ? bf16_rows(x, b, k, buf) : nullptr;
#if HYBRIDLM_AMX
    if constexpr (std::is_same_v<T, bf16>) {
        if (b >= AMX_MIN_ROWS && k >= 32 && r1 - r0 >= 16 && !amx_off && amx_granted()) {
            int64_t done = r0;
            for (int64_t b0 = 0; b0 < b; b0 += 16)
                done = gemv_rows_amx(w, bias, xh + b0 * k, x + b0 * k, out + b0 * ldo, ldo, std::min<int64_t>(16, b - b0),
                                     k, r0, r1);
            r0 = done;     // fewer than 16 rows left: row_dot below
        }
    }
#endif
    for (int64_t r = r0; r < r1; ++r) {
        const T* wr = w + r * k;
        for (int64_t b0 = 0; b0 < b; b0 += BF) {
            const int64_t nb = std::min<int64_t>(BF, b - b0);
            const float* xb = x + b0 * k;
            const bf16* xhb = xh ? xh + b0 * k : nullptr;
            switch (nb) {
                case 1: row_dot_any<1>(wr, xhb, xb, k, s); break;
                case 2: row_dot_any<2>(wr, xhb, xb, k, s); break;
                case 3: row_dot_any<3>(wr, xhb, xb, k, s); break;
                case 4: row_dot_any<4>(wr, xhb, xb, k, s); break;
                case 5: row_dot_any<5>(wr, xhb, xb, k, s); break;
                case 6: row_dot_any<6>(wr, xhb, xb, k, s); break;
                case 7: row_dot_any<7>(wr, xhb, xb, k, s); break;
                default: row_dot_any<8>(wr, xhb, xb, k, s); break;
            }
            for (int64_t j = 0; j < nb; ++j) out[(b0 + j) * ldo + r] = s[j] + (bias ? bias[r] : 0.0f);
        }
    }
}

// Quantized weights (mat.h: tiles of 8 rows) multiply int8 activations, as llama.cpp does: each row of x is
// cut into blocks of 32 columns, each block quantized to int8 with its own scale dx = max|x| / 127 (q =
// round(x / dx)), and a block's product is an exact integer dot, times dx * the weight's scale:
//     int8 / symmetric int4 (w = (q - 8) s)     sum_blocks  dx s * sum_c wq_c xq_c        (wq signed)
//     asymmetric int4 (w = q s + min)            sum_blocks  dx s * sum_c q_c xq_c + min * dx * sum_c xq_c
// quant.py's QuantLinear.product_ref is the reference twin (same rounding, same integers).
struct QX {            // x [b, ld] quantized per 32-column block
    std::vector<int8_t> q;
    std::vector<float> d, sum;   // [b, ld / 32]: the block's scale, and dx * its sum of xq (asymmetric weights)
    std::vector<int32_t> corr;   // [b, ld / 32]: 8 * the block's sum of xq (symmetric int4's -8, per block)
    std::vector<int32_t> xv;     // [ld / 32, 4, 16]: the last row, for int4 times one row on 512-bit registers
};

inline void quantize_x(const float* x, int64_t b, int64_t k, int64_t ld, QX& out) {
    const int64_t nb = ld / 32;
    out.q.assign(b * ld, 0);
    out.d.assign(b * nb, 0.0f);
    out.sum.assign(b * nb, 0.0f);
    out.corr.assign(b * nb, 0);
    for (int64_t j = 0; j < b; ++j)
        for (int64_t blk = 0; blk < nb; ++blk) {
            const int64_t c0 = blk * 32, c1 = std::min(k, c0 + 32);
#ifdef __AVX2__
            if (c1 - c0 == 32) {      // the same in AVX2 registers (cvtps rounds to nearest even, as nearbyint)
                const float* xr = x + j * k + c0;
                const __m256 sign = _mm256_set1_ps(-0.0f);
                __m256 v[4], m = _mm256_setzero_ps();
                for (int i = 0; i < 4; ++i) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i] = _mm256_loadu_ps(xr + 8 * i)));
                __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
                h = _mm_max_ps(h, _mm_movehl_ps(h, h));
                const float d = std::max(_mm_cvtss_f32(h), _mm_cvtss_f32(_mm_movehdup_ps(h))) / 127.0f;
                const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
                __m256i q[4], sum = _mm256_setzero_si256();
                for (int i = 0; i < 4; ++i) sum = _mm256_add_epi32(sum, q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id)));
                // int32 -> int8, back in column order (the packs interleave 128-bit lanes)
                const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + j * ld + c0),
                                    _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
                __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
                s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
                const int32_t total = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1)));
                out.d[j * nb + blk] = d;
                out.sum[j * nb + blk] = d * static_cast<float>(total);
                out.corr[j * nb + blk] = 8 * total;
                continue;
            }
#endif
            float amax = 0.0f;
            for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(x[j * k + c]));
            const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            int32_t sum = 0;
            for (int64_t c = c0; c < c1; ++c) {
                out.q[j * ld + c] = static_cast<int8_t>(std::nearbyint(x[j * k + c] * id));
                sum += out.q[j * ld + c];
            }
            out.d[j * nb + blk] = d;
            out.sum[j * nb + blk] = d * static_cast<float>(sum);
            out.corr[j * nb + blk] = 8 * sum;
        }
}

#if HYBRIDLM_I4_ZMM
// int4 tiles on 512-bit registers (tile_dot) take each block of x as 4 vectors of 16 int32 lanes, a lane
// holding 4 columns: lanes 0-7 match a sub-block's rows, lanes 8-15 the next sub-block's rows, so the 4
// vectors are columns (0-3, 8-11), (4-7, 12-15), (16-19, 24-27), (20-23, 28-31): the low and high nibbles of
// sub-blocks 0 and 1, then of 2 and 3 (mat.h). Only row `row` of x: the one a one-row pass takes (gemv_q).
inline void spread_x(QX& qx, int64_t row, int64_t ld) {
    const int64_t nb = ld / 32;
    constexpr int pair[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};
    qx.xv.resize(nb * 64);
    for (int64_t i = 0; i < nb; ++i) {
        int32_t c4[8];                         // the block's 32 int8 as 8 groups of 4 columns
        std::memcpy(c4, qx.q.data() + row * ld + i * 32, 32);
        for (int v = 0; v < 4; ++v)
            _mm512_storeu_si512(qx.xv.data() + (i * 4 + v) * 16,
                                _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(c4[pair[v][0]])),
                                                   _mm256_set1_epi32(c4[pair[v][1]]), 1));
    }
}
#endif

inline float scale_of(const float* p, int64_t i) { return p[i]; }
inline float scale_of(const bf16* p, int64_t i) { return bf2f(p[i]); }

// A tile's 8 rows times NB rows of x: s[j * 8 + i] = the product of tile row i with x row j (mat.h's tile
// layout; see above). Each step multiplies 4 bytes of every tile row (one 32-byte load) by the same 4 int8
// activations broadcast to all 8 lanes, so lane i is row i's sum: no horizontal sums, and a block's 8 row
// scales are one vector. int4: the nibbles are unsigned 0..15 (maddubs takes them as its unsigned operand);
// a block's 8 maddubs add up in int16 (|.| <= 8 * 2 * 15 * 127 < 2^15) before one madd. int8: signed x
// signed through |w| and x carrying w's sign, summed in int32 per step (2 * 127 * 127 leaves no room).
// With VNNI (AVX512-VNNI on 256-bit registers, or AVX-VNNI) one vpdpbusd does a step's multiply-and-add into
// int32 (unsigned nibbles or |w| times signed x): 2 instructions fewer per step and no int16 sums.
// int4 times one row of x (decode) with AVX512-VNNI: 512-bit registers take two sub-blocks (lanes 8-15 the
// second one's rows) times x as spread_x lays it out (xv), and the two halves are added: half the
// instructions of the 256-bit steps, which kept the product short of the memory bound on Sapphire Rapids
// (87% of the read bandwidth; 104% with half its multiplies taken out, as a test; now 91-97%). With 2+ rows
// of x the spread rows outgrow L1 (20 KiB per row at k = 2560) and the 256-bit steps were as fast or faster
// (4 rows: 64 vs 52 ms per pass over 1 GiB); x permuted into place in registers instead cost 1-row decode 7%.
template <int NB, int KIND, bool ASYM, typename S>
inline void tile_dot(const Mat& m, int64_t t, const int8_t* xq, const float* xd, const float* xs, const int32_t* xc,
                     const int32_t* xv, int shift, float* s) {
    const int64_t ld = m.ld, nb = ld / 32, ng = ld / m.group;
    const S* sc = static_cast<const S*>(m.scale) + t * ng * 8;
    const S* mn = ASYM ? static_cast<const S*>(m.min) + t * ng * 8 : nullptr;
#ifdef __AVX2__
    constexpr int TB = KIND == I8 ? 256 : 128;               // bytes per tile block
    const uint8_t* w = static_cast<const uint8_t*>(m.data) + t * nb * TB;
    auto bcast = [](const int8_t* p) __attribute__((always_inline)) {
        int32_t v;
        std::memcpy(&v, p, 4);
        return _mm256_set1_epi32(v);
    };
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[NB];
    for (int j = 0; j < NB; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < nb; ++blk) {
        const uint8_t* wb = w + blk * TB;
        for (int64_t o = 0; o < TB; o += 64)
            _mm_prefetch(reinterpret_cast<const char*>(wb + PREFETCH_AHEAD + o), _MM_HINT_T1);
        __m256i isum[NB];
        for (int j = 0; j < NB; ++j) isum[j] = _mm256_setzero_si256();
#ifdef HYBRIDLM_DPBUSD
        // vpdpbusd's latency is 5 cycles: one chain of a block's 8 steps per row of x would wait on itself
        // (measured 10.5 tok/s on the 3B int4 where 4 chains give more), so CH chains per row, added at the end
        constexpr int CH = NB >= 4 ? 1 : 4 / NB;
        __m256i part[NB][CH];
        for (int j = 0; j < NB; ++j)
            for (int c = 0; c < CH; ++c) part[j][c] = _mm256_setzero_si256();
#endif
        if constexpr (KIND == I4 && HYBRIDLM_I4_ZMM && NB == 1) {      // xv: see gemv_q
#if HYBRIDLM_I4_ZMM
            const __m512i low = _mm512_set1_epi8(15);
            const __m512i v0 = _mm512_loadu_si512(wb), v1 = _mm512_loadu_si512(wb + 64);
            const __m512i l0 = _mm512_and_si512(v0, low), h0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), low);
            const __m512i l1 = _mm512_and_si512(v1, low), h1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), low);
            const int32_t* xp = xv + blk * 64;
            __m512i lo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), l0, _mm512_loadu_si512(xp));
            __m512i hi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), h0, _mm512_loadu_si512(xp + 16));
            lo = _mm512_dpbusd_epi32(lo, l1, _mm512_loadu_si512(xp + 32));
            hi = _mm512_dpbusd_epi32(hi, h1, _mm512_loadu_si512(xp + 48));
            lo = _mm512_add_epi32(lo, hi);
            isum[0] = _mm256_add_epi32(_mm512_castsi512_si256(lo), _mm512_extracti64x4_epi64(lo, 1));
            if (!ASYM) isum[0] = _mm256_sub_epi32(isum[0], _mm256_set1_epi32(xc[blk]));
#endif
        } else if constexpr (KIND == I4) {
            const __m256i low = _mm256_set1_epi8(15);
            for (int sb = 0; sb < 4; ++sb) {      // columns 8 sb + 0..3 (low nibbles), 8 sb + 4..7 (high)
                const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * sb));
                const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                for (int j = 0; j < NB; ++j) {
                    const int8_t* xp = xq + j * ld + blk * 32 + 8 * sb;
#ifdef HYBRIDLM_DPBUSD
                    part[j][(2 * sb) % CH] = HYBRIDLM_DPBUSD(part[j][(2 * sb) % CH], lo, bcast(xp));
                    part[j][(2 * sb + 1) % CH] = HYBRIDLM_DPBUSD(part[j][(2 * sb + 1) % CH], hi, bcast(xp + 4));
#else
                    isum[j] = _mm256_add_epi16(isum[j], _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast(xp)),
                                                                         _mm256_maddubs_epi16(hi, bcast(xp + 4))));
#endif
                }
            }
            for (int j = 0; j < NB; ++j) {
#ifdef HYBRIDLM_DPBUSD
                for (int c = 0; c < CH; ++c) isum[j] = _mm256_add_epi32(isum[j], part[j][c]);
#else
                isum[j] = _mm256_madd_epi16(isum[j], ones);
#endif
                if (!ASYM) isum[j] = _mm256_sub_epi32(isum[j], _mm256_set1_epi32(xc[j * nb + blk]));
            }
        } else {
            for (int sb = 0; sb < 8; ++sb) {      // columns 4 sb + 0..3
                const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * sb));
                const __m256i a = _mm256_sign_epi8(v, v);
                for (int j = 0; j < NB; ++j) {
                    const __m256i xs8 = _mm256_sign_epi8(bcast(xq + j * ld + blk * 32 + 4 * sb), v);
#ifdef HYBRIDLM_DPBUSD
                    part[j][sb % CH] = HYBRIDLM_DPBUSD(part[j][sb % CH], a, xs8);
#else
                    isum[j] = _mm256_add_epi32(isum[j], _mm256_madd_epi16(_mm256_maddubs_epi16(a, xs8), ones));
#endif
                }
            }
#ifdef HYBRIDLM_DPBUSD
            for (int j = 0; j < NB; ++j)
                for (int c = 0; c < CH; ++c) isum[j] = _mm256_add_epi32(isum[j], part[j][c]);
#endif
        }
        const __m256 sw = load8(sc + (blk >> shift) * 8), mv = ASYM ? load8(mn + (blk >> shift) * 8) : sw;
        for (int j = 0; j < NB; ++j) {
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[j]), _mm256_mul_ps(sw, _mm256_set1_ps(xd[j * nb + blk])),
                                     acc[j]);
            if (ASYM) acc[j] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xs[j * nb + blk]), acc[j]);
        }
    }
    for (int j = 0; j < NB; ++j) _mm256_storeu_ps(s + 8 * j, acc[j]);
#else
    for (int j = 0; j < NB * 8; ++j) s[j] = 0.0f;
    for (int64_t blk = 0; blk < nb; ++blk) {
        const int64_t G = (blk >> shift) * 8;
        for (int i = 0; i < 8; ++i) {
            int32_t q[32];
            tile_q(m, t, blk, i, q);                  // row i's 32 integers of this block (mat.h)
            for (int j = 0; j < NB; ++j) {
                const int8_t* x = xq + j * ld + blk * 32;
                int32_t dot = 0;
                for (int c = 0; c < 32; ++c) dot += q[c] * x[c];
                if (KIND == I4 && !ASYM) dot -= xc[j * nb + blk];
                s[j * 8 + i] += xd[j * nb + blk] * scale_of(sc, G + i) * static_cast<float>(dot);
                if (ASYM) s[j * 8 + i] += scale_of(mn, G + i) * xs[j * nb + blk];
            }
        }
    }
#endif
}

// out[bj, r] (+ bias[r]) for output rows [r0, r1) and the b quantized rows of x: every tile that holds one of
// those rows, NB <= BB rows of x per pass over it; lanes outside [r0, r1) are not written
template <int KIND, bool ASYM, typename S>
void gemv_rows_q(const Mat& m, const float* bias, const QX& qx, float* out, int64_t ldo, int64_t b, int64_t r0,
                 int64_t r1) {
    const int64_t per = m.group / 32, nb = m.ld / 32;
    int shift = 0;
    while ((int64_t{1} << shift) < per) ++shift;
    if ((int64_t{1} << shift) != per) shift = 62;      // not a power of 2: per channel, one group
    float s[BB * 8];
    // many rows of x (prefill): tiles of x rows small enough to stay in L2 while every weight tile of this
    // thread passes over them (each weight tile is read once per x tile)
    const int64_t xt = std::max<int64_t>(BB, (X_TILE_BYTES / std::max<int64_t>(m.ld, 1)) / BB * BB);
    for (int64_t t0 = 0; t0 < b; t0 += xt)
    for (int64_t t = r0 / 8; t * 8 < r1; ++t)
        for (int64_t b0 = t0; b0 < std::min(b, t0 + xt); b0 += BB) {
            const int64_t n = std::min<int64_t>(BB, b - b0);
            const int8_t* xq = qx.q.data() + b0 * m.ld;
            const float *xd = qx.d.data() + b0 * nb, *xs = qx.sum.data() + b0 * nb;
            const int32_t* xc = qx.corr.data() + b0 * nb;
            const int32_t* xv = KIND == I4 && HYBRIDLM_I4_ZMM && n == 1 ? qx.xv.data() : nullptr;   // row b - 1
            switch (n) {
                case 1: tile_dot<1, KIND, ASYM, S>(m, t, xq, xd, xs, xc, xv, shift, s); break;
                case 2: tile_dot<2, KIND, ASYM, S>(m, t, xq, xd, xs, xc, xv, shift, s); break;
                case 3: tile_dot<3, KIND, ASYM, S>(m, t, xq, xd, xs, xc, xv, shift, s); break;
                default: tile_dot<4, KIND, ASYM, S>(m, t, xq, xd, xs, xc, xv, shift, s); break;
            }
            const int64_t i0 = std::max(r0, t * 8), i1 = std::min(r1, t * 8 + 8);
            for (int64_t j = 0; j < n; ++j)
                for (int64_t r = i0; r < i1; ++r) out[(b0 + j) * ldo + r] = s[j * 8 + r - t * 8] + (bias ? bias[r] : 0.0f);
        }
}

template <int KIND, bool ASYM>
inline void gemv_rows_q(const Mat& m, const float* bias, const QX& qx, float* out, int64_t ldo, int64_t b,
                        int64_t r0, int64_t r1) {
    if (m.scale_bf16) gemv_rows_q<KIND, ASYM, bf16>(m, bias, qx, out, ldo, b, r0, r1);
    else gemv_rows_q<KIND, ASYM, float>(m, bias, qx, out, ldo, b, r0, r1);
}

// a quantized gemv: x quantized (once per call of this thread), then its rows
inline void gemv_q(const Mat& w, const float* bias, const float* x, float* out, int64_t ldo, int64_t b, int64_t k,
                   int64_t r0, int64_t r1) {
    thread_local QX qx;
    quantize_x(x, b, k, w.ld, qx);
#if HYBRIDLM_I4_ZMM
    // passes take BB rows of x at a time (x tiles are whole passes), so a one-row pass is the last row's
    if (w.kind == I4 && b % BB == 1) spread_x(qx, b - 1, w.ld);
#endif
    if (w.kind == I8) gemv_rows_q<I8, false>(w, bias, qx, out, ldo, b, r0, r1);
    else if (w.min) gemv_rows_q<I4, true>(w, bias, qx, out, ldo, b, r0, r1);
    else gemv_rows_q<I4, false>(w, bias, qx, out, ldo, b, r0, r1);
}

// out[bi, r] = dot(row r of w, x[bi]) (+ bias[r]) for rows [r0, r1), whatever w's kind
inline void gemv(const Mat& w, const float* bias, const float* x, float* out, int64_t ldo, int64_t b, int64_t k,
                 int64_t r0, int64_t r1) {
    switch (w.kind) {
        case F32: gemv_rows(static_cast<const float*>(w.data), bias, x, out, ldo, b, k, r0, r1); break;
        case BF16: gemv_rows(static_cast<const bf16*>(w.data), bias, x, out, ldo, b, k, r0, r1); break;
        default: gemv_q(w, bias, x, out, ldo, b, k, r0, r1); break;
    }
}

// this thread's share of a gemv of `rows` outputs
inline void gemv_share(const Mat& w, const float* bias, const float* x, float* out, int64_t ldo, int64_t b, int64_t k,
                       int64_t rows) {
    int64_t r0, r1;
    split(rows, omp_get_thread_num(), omp_get_num_threads(), RB, r0, r1);
    gemv(w, bias, x, out, ldo, b, k, r0, r1);
}

}  // namespace

extern "C" {

// which integer dot products the quantized kernels were compiled with: 3 AVX512-VNNI, 2 AVX-VNNI, 1 AVX2
// (maddubs + madd), 0 portable C++
int hybridlm_int_dot_path() { return HYBRIDLM_INT_DOT; }

// whether bf16 products of several rows run on AMX tiles (gemv_rows_amx): 1 yes, 0 not compiled for this
// CPU or not granted by the OS; off != 0 turns the tiles off (-1: only ask)
int hybridlm_amx_tiles(int off) {
#if HYBRIDLM_AMX
    if (off >= 0) amx_off = off;
    return !amx_off && amx_granted();
#else
    (void)off;
    return 0;
#endif
}

// out [b, o] (fp32 or bf16) = x [b, k] (fp32 or bf16) @ w[o, k]^T (+ bias fp32 [o])
void hybridlm_linear_step(const void* x, int act_bf16, const Mat* w, const float* bias, void* out,
                          int64_t b, int64_t k, int64_t o, int threads) {
    std::vector<float> xf = load_act(x, b * k, act_bf16), of(act_bf16 ? b * o : 0);
    float* y = act_bf16 ? of.data() : static_cast<float*>(out);     // fp32: straight into out
#pragma omp parallel num_threads(threads)
    {
        int64_t r0, r1;
        split(o, omp_get_thread_num(), omp_get_num_threads(), RB, r0, r1);
        gemv(*w, bias, xf.data(), y, o, b, k, r0, r1);
        if (act_bf16) store_cols(out, y, b, o, r0, r1, act_bf16);
    }
}

}  // extern "C"

namespace {

// Inside a parallel region: of [b, d] = down(silu(gate(x)) * up(x)) for x fp32 [b, d]; g and u are
// [b, f] scratch. Each thread ends owning rows [r0, r1) of of's d columns (returned), with no barrier
// after the last phase.
void mlp_share(const float* xf, const Mat& wg, const Mat& wu, const Mat& wd, float* g, float* u,
               float* of, int64_t b, int64_t d, int64_t f, int64_t& r0, int64_t& r1) {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    split(f, t, nt, RB, r0, r1);
    gemv(wg, nullptr, xf, g, f, b, d, r0, r1);
    gemv(wu, nullptr, xf, u, f, b, d, r0, r1);
    for (int64_t bi = 0; bi < b; ++bi)
        for (int64_t r = r0; r < r1; ++r) {
            const float gv = g[bi * f + r];
            g[bi * f + r] = gv * sigmoidf(gv) * u[bi * f + r];
        }
#pragma omp barrier
    split(d, t, nt, RB, r0, r1);
    gemv(wd, nullptr, g, of, d, b, f, r0, r1);
}

}  // namespace

extern "C" {

// out [b, d] = down(silu(gate(x)) * up(x)); x and out [b, d], weights gate/up [f, d], down [d, f]
void hybridlm_mlp_step(const void* x, void* out, int act_bf16, const Mat* wg, const Mat* wu, const Mat* wd,
                       int64_t b, int64_t d, int64_t f, int threads) {
    std::vector<float> xf = load_act(x, b * d, act_bf16), g(b * f), u(b * f), of(b * d);
#pragma omp parallel num_threads(threads)
    {
        int64_t r0, r1;
        mlp_share(xf.data(), *wg, *wu, *wd, g.data(), u.data(), of.data(), b, d, f, r0, r1);
        store_cols(out, of.data(), b, d, r0, r1, act_bf16);
    }
}

// Jamba's MoE (moe.py) for a few rows: router logits [b, e] (written to `logits`, fp32), softmax in
// fp32, the top-k experts of each row (ties: the lower expert id), their probabilities as weights
// (renormalised to sum 1 when `renorm`), out [b, d] = sum of weight * expert MLP(x), added in expert-id
// order. wg/wu/wd: arrays of e pointers to each expert's gate/up [f, d] and down [d, f].
void hybridlm_moe_step(const void* x, void* out, int act_bf16, const Mat* router, const Mat* const* wg,
                       const Mat* const* wu, const Mat* const* wd, float* logits, int64_t b,
                       int64_t d, int64_t f, int64_t e, int64_t topk, int renorm, int threads) {
    std::vector<float> xf = load_act(x, b * d, act_bf16), acc(b * d, 0.0f), prob(e);
    std::vector<int64_t> chosen(b * topk);
    std::vector<float> weight(b * topk);
    gemv(*router, nullptr, xf.data(), logits, e, b, d, 0, e);
    for (int64_t bi = 0; bi < b; ++bi) {
        const float* lg = logits + bi * e;
        const float mx = *std::max_element(lg, lg + e);
        float den = 0.0f;
        for (int64_t j = 0; j < e; ++j) den += (prob[j] = std::exp(lg[j] - mx));
        std::vector<bool> taken(e, false);
        float sum = 0.0f;
        for (int64_t q = 0; q < topk; ++q) {          // k largest, lower id first on ties
            int64_t best = -1;
            for (int64_t j = 0; j < e; ++j)
                if (!taken[j] && (best < 0 || prob[j] > prob[best])) best = j;
            taken[best] = true;
            chosen[bi * topk + q] = best;
            sum += (weight[bi * topk + q] = prob[best] / den);
        }
        if (renorm)
            for (int64_t q = 0; q < topk; ++q) weight[bi * topk + q] /= sum;
    }
    // each chosen expert once, in id order, over all the rows that chose it (its weights read once per 4
    // rows, not once per row); a row's expert outputs are added in expert-id order, as MoE.forward adds them
    std::vector<int64_t> who;
    std::vector<float> xs(b * d), g(b * f), u(b * f), of(b * d), ws;
    for (int64_t ex = 0; ex < e; ++ex) {
        who.clear();
        ws.clear();
        for (int64_t bi = 0; bi < b; ++bi)
            for (int64_t q = 0; q < topk; ++q)
                if (chosen[bi * topk + q] == ex) {
                    who.push_back(bi);
                    ws.push_back(weight[bi * topk + q]);
                }
        const int64_t nb = static_cast<int64_t>(who.size());
        if (!nb) continue;
        for (int64_t i = 0; i < nb; ++i) std::copy(xf.data() + who[i] * d, xf.data() + (who[i] + 1) * d, xs.data() + i * d);
#pragma omp parallel num_threads(threads)
        {
            int64_t r0 = 0, r1 = 0;
            mlp_share(xs.data(), *wg[ex], *wu[ex], *wd[ex], g.data(), u.data(), of.data(), nb, d, f, r0, r1);
            for (int64_t i = 0; i < nb; ++i)
                for (int64_t r = r0; r < r1; ++r) acc[who[i] * d + r] += ws[i] * of[i * d + r];
        }
    }
#pragma omp parallel num_threads(threads)
    {
        int64_t r0, r1;
        split(d, omp_get_thread_num(), omp_get_num_threads(), RB, r0, r1);
        store_cols(out, acc.data(), b, d, r0, r1, act_bf16);
    }
}

// The Mamba mixer (mamba.py) for one token per row: in_proj, causal conv step + SiLU, x_proj, RMSNorms
// on dt/B/C, dt_proj + softplus, one selective-scan step, D skip, SiLU(z) gate, out_proj.
// conv_w [d_in, k]; A [d_in, n] = -exp(A_log); norms dt_ln [r], b_ln [n], c_ln [n]; biases may be null
// except dt_bias.
void hybridlm_mamba_step(const void* x, void* out, int act_bf16,
                         const Mat* w_in, const Mat* w_x, const Mat* w_dt, const Mat* w_out,
                         const float* in_bias, const float* out_bias, const float* conv_w, const float* conv_b,
                         const float* dt_ln, const float* b_ln, const float* c_ln, float eps,
                         const float* dt_bias, const float* A, const float* Dp,
                         void* conv_state, int state_bf16, float* ssm,
                         int64_t b, int64_t d, int64_t d_in, int64_t n, int64_t r, int64_t k, int threads) {
    mamba_tokens(x, out, act_bf16, w_in, w_x, w_dt, w_out, in_bias, out_bias, conv_w, conv_b, dt_ln, b_ln, c_ln, eps,
                 dt_bias, A, Dp, conv_state, state_bf16, ssm, b, 1, nullptr, nullptr, d, d_in, n, r, k, threads);
}

// The Mamba-2 mixer (mamba2.py) for one token per row: in_proj -> [z | x B C | dt]; causal conv step + SiLU
// over x, B and C; dt = softplus(dt + dt_bias) clamped to [dt_lo, dt_hi]; per head i (group i / (h / g)) and
// channel j: S = exp(dt_i A_i) S + dt_i x_ij B, y_ij = S . C + D_i x_ij; the gated RMSNorm of y * silu(z)
// over groups of `group` channels (weight norm_w); out_proj. fp32 throughout. conv_w [conv_dim, k];
// conv_state [b, conv_dim, k-1] (fp32 or bf16); ssm [b, h, p, n] fp32; A [h] = -exp(A_log); D, dt_bias [h].
void hybridlm_mamba2_step(const void* x, void* out, int act_bf16, const Mat* w_in, const Mat* w_out,
                          const float* in_bias, const float* out_bias, const float* conv_w, const float* conv_b,
                          const float* dt_bias, float dt_lo, float dt_hi, const float* A, const float* Dp,
                          const float* norm_w, int64_t group, float eps, void* conv_state, int state_bf16, float* ssm,
                          int64_t b, int64_t d, int64_t h, int64_t p, int64_t g, int64_t n, int64_t k, int threads) {
    const int64_t d_in = h * p, conv_dim = d_in + 2 * g * n, proj = d_in + conv_dim + h;
    std::vector<float> xf = load_act(x, b * d, act_bf16), zx(b * proj), xc(b * conv_dim), dtv(b * h), y(b * d_in),
        of(b * d);
    const bool s16 = state_bf16;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t c0, c1;
        gemv_share(*w_in, in_bias, xf.data(), zx.data(), proj, b, d, proj);
#pragma omp barrier
        // conv step + SiLU over x, B, C (columns d_in .. d_in + conv_dim of the projection)
        split(conv_dim, t, nt, W, c0, c1);
        for (int64_t bi = 0; bi < b; ++bi)
            for (int64_t c = c0; c < c1; ++c) {
                xc[bi * conv_dim + c] = conv_step(conv_state, s16, (bi * conv_dim + c) * (k - 1), conv_w + c * k,
                                                  conv_b ? conv_b[c] : 0.0f, zx[bi * proj + d_in + c], k);
            }
#pragma omp single
        for (int64_t bi = 0; bi < b; ++bi)
            for (int64_t i = 0; i < h; ++i) {
                const float v = zx[bi * proj + d_in + conv_dim + i] + dt_bias[i];
                dtv[bi * h + i] = std::min(dt_hi, std::max(dt_lo, v > 20.0f ? v : std::log1p(std::exp(v))));
            }
        // (implicit barrier) the state update and read-out, split by heads
        split(h, t, nt, 1, c0, c1);
        for (int64_t bi = 0; bi < b; ++bi)
            for (int64_t i = c0; i < c1; ++i) {
                const float dt = dtv[bi * h + i], decay = std::exp(dt * A[i]);
                const int64_t gi = i / (h / g);
                const float* Bv = xc.data() + bi * conv_dim + d_in + gi * n;
                const float* Cv = xc.data() + bi * conv_dim + d_in + g * n + gi * n;
                for (int64_t j = 0; j < p; ++j) {
                    const float xv = xc[bi * conv_dim + i * p + j], dx = dt * xv;
                    float* S = ssm + ((bi * h + i) * p + j) * n;
                    const float yc = state_row(S, nullptr, 0.0f, decay, dx, Bv, Cv, n);
                    const float z = zx[bi * proj + i * p + j];
                    y[bi * d_in + i * p + j] = (yc + Dp[i] * xv) * (z * sigmoidf(z));
                }
            }
#pragma omp barrier
        // gated RMSNorm per group of `group` channels (y already holds y * silu(z))
        split(b * (d_in / group), t, nt, 1, c0, c1);
        for (int64_t gr = c0; gr < c1; ++gr) {
            float* u = y.data() + gr * group;
            float ss = 0.0f;
            for (int64_t c = 0; c < group; ++c) ss += u[c] * u[c];
            const float inv = 1.0f / std::sqrt(ss / static_cast<float>(group) + eps);
            const int64_t c_off = gr * group % d_in;
            for (int64_t c = 0; c < group; ++c) u[c] = u[c] * inv * norm_w[c_off + c];
        }
#pragma omp barrier
        split(d, t, nt, RB, c0, c1);
        gemv(*w_out, out_bias, y.data(), of.data(), d, b, d_in, c0, c1);
        store_cols(out, of.data(), b, d, c0, c1, act_bf16);
    }
}

}  // extern "C"

namespace {

// The mixer for `tokens` consecutive tokens of each of b state rows: activation row i is token i % tokens
// of state row i / tokens. The projections take all b * tokens rows in one pass over each weight; the conv
// and the scan run the tokens of a state row in order (each channel's rows are visited in row order by the
// one thread that owns the channel). trail_u [b * tokens, d_in] and trail_ssm [b * tokens, d_in, n], when
// not null, receive each token's conv input and the SSM state before it (Cache.checkpoint(trail=True)).
void mamba_tokens(const void* x, void* out, int act_bf16,
                  const Mat* w_in, const Mat* w_x, const Mat* w_dt, const Mat* w_out,
                  const float* in_bias, const float* out_bias, const float* conv_w, const float* conv_b,
                  const float* dt_ln, const float* b_ln, const float* c_ln, float eps,
                  const float* dt_bias, const float* A, const float* Dp,
                  void* conv_state, int state_bf16, float* ssm, int64_t rows, int64_t tokens,
                  float* trail_u, float* trail_ssm,
                  int64_t d, int64_t d_in, int64_t n, int64_t r, int64_t k, int threads) {
    const int64_t b = rows * tokens, nx = r + 2 * n;
    std::vector<float> xf = load_act(x, b * d, act_bf16), xz(b * 2 * d_in), u(b * d_in), dbc(b * nx), y(b * d_in),
        of(b * d), dt(b * r), dtp(b * d_in);
    const bool s16 = state_bf16;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t c0, c1;
        // xz = in_proj(x): u = xz[:, :d_in], z = xz[:, d_in:]
        gemv_share(*w_in, in_bias, xf.data(), xz.data(), 2 * d_in, b, d, 2 * d_in);
#pragma omp barrier
        // causal conv step + SiLU; the window shifts left and takes the new input
        split(d_in, t, nt, W, c0, c1);
        for (int64_t bi = 0; bi < b; ++bi)
            for (int64_t c = c0; c < c1; ++c) {
                const float xin = xz[bi * 2 * d_in + c];
                if (trail_u) trail_u[bi * d_in + c] = xin;
                u[bi * d_in + c] = conv_step(conv_state, s16, (bi / tokens * d_in + c) * (k - 1), conv_w + c * k,
                                             conv_b ? conv_b[c] : 0.0f, xin, k);
            }
#pragma omp barrier
        // dt, B, C = x_proj(u), then their RMSNorms
        gemv_share(*w_x, nullptr, u.data(), dbc.data(), nx, b, d_in, nx);
#pragma omp barrier
#pragma omp single
        for (int64_t bi = 0; bi < b; ++bi) {                  // in place, fp32 (elementwise.cpp)
            float* row = dbc.data() + bi * nx;
            hybridlm_rmsnorm(row, row, 0, dt_ln, 0, eps, 1, r, 1);
            hybridlm_rmsnorm(row + r, row + r, 0, b_ln, 0, eps, 1, n, 1);
            hybridlm_rmsnorm(row + r + n, row + r + n, 0, c_ln, 0, eps, 1, n, 1);
            std::copy(row, row + r, dt.data() + bi * r);
        }
        // (implicit barrier) per channel: delta = softplus(dt_proj(dt) + bias), the scan step, D skip, gate
        gemv(*w_dt, dt_bias, dt.data(), dtp.data(), d_in, b, r, c0, c1);
        for (int64_t bi = 0; bi < b; ++bi) {
            const float* Bv = dbc.data() + bi * nx + r;
            const float* Cv = Bv + n;
            for (int64_t c = c0; c < c1; ++c) {
                const float s = dtp[bi * d_in + c];
                const float delta = s > 20.0f ? s : std::log1p(std::exp(s));   // softplus, threshold 20
                const float uc = u[bi * d_in + c];
                float* h = ssm + (bi / tokens * d_in + c) * n;
                if (trail_ssm) std::copy(h, h + n, trail_ssm + (bi * d_in + c) * n);
                const float yc = state_row(h, A + c * n, delta, 0.0f, delta * uc, Bv, Cv, n);
                const float z = xz[bi * 2 * d_in + d_in + c];
                y[bi * d_in + c] = (yc + Dp[c] * uc) * (z * sigmoidf(z));
            }
        }
#pragma omp barrier
        // out = out_proj(y)
        split(d, t, nt, RB, c0, c1);
        gemv(*w_out, out_bias, y.data(), of.data(), d, b, d_in, c0, c1);
        store_cols(out, of.data(), b, d, c0, c1, act_bf16);
    }
}

// acc[j, :] += sum_t p[j * ps + t] * V[t, :] for GB query heads j and nb slots t of V [nb, NV * W], with
// the GB x NV accumulator vectors held in registers (kept in memory, each multiply-add also costs a
// load and a store, and the next slot waits on the store)
template <int GB, int NV, typename T>
inline void weighted_v(const T* V, const float* p, int64_t ps, int64_t nb, float* acc) {
    constexpr int64_t dh = NV * W;
    vf a[GB][NV];
    for (int j = 0; j < GB; ++j)
        for (int v = 0; v < NV; ++v) a[j][v] = load(acc + j * dh + v * W, W);
    for (int64_t t = 0; t < nb; ++t)
        for (int v = 0; v < NV; ++v) {
            const vf vv = load(V + t * dh + v * W, W);
            for (int j = 0; j < GB; ++j) a[j][v] += p[j * ps + t] * vv;
        }
    for (int j = 0; j < GB; ++j)
        for (int v = 0; v < NV; ++v) store(acc + j * dh + v * W, a[j][v], W);
}

// weighted_v over all g query heads of a kv head, up to 16 accumulator vectors at a time
template <int NV, typename T>
inline void weighted_v_heads(const T* V, const float* p, int64_t ps, int64_t nb, float* acc, int64_t g) {
    constexpr int GB = NV >= 8 ? 2 : 4;
    int64_t j = 0;
    for (; j + GB <= g; j += GB) weighted_v<GB, NV>(V, p + j * ps, ps, nb, acc + j * NV * W);
    for (; j < g; ++j) weighted_v<1, NV>(V, p + j * ps, ps, nb, acc + j * NV * W);
}

// the register-blocked weighted sum for head widths of 1, 2, 4 or 8 vectors; false for other widths
template <typename T>
inline bool weighted_v_any(const T* V, int64_t nv, const float* p, int64_t ps, int64_t nb, float* acc, int64_t g) {
    switch (nv) {
        case 1: weighted_v_heads<1>(V, p, ps, nb, acc, g); return true;
        case 2: weighted_v_heads<2>(V, p, ps, nb, acc, g); return true;
        case 4: weighted_v_heads<4>(V, p, ps, nb, acc, g); return true;
        case 8: weighted_v_heads<8>(V, p, ps, nb, acc, g); return true;
        default: return false;
    }
}

}  // namespace

extern "C" {

// One query token per row against the K/V cache (flash-decoding): for each query head
//     out[bi, hi] = softmax(scale * q[bi, hi] . K[bi, g(hi), :s] masked by valid[bi, :s]) @ V[bi, g(hi), :s]
// q, out [b, h, dh] (act dtype); kc, vc [b, h_kv, S, dh] (kv dtype), slots [0, s) read; valid: row bi at
// valid + bi * valid_stride (1 = a real token), or null. Query head hi reads kv head hi / (h / h_kv).
// The slots of each (row, kv head) are cut into `parts` runs handled by different threads, each
// keeping a running max, sum and weighted sum of V over blocks of slots; the runs are merged at the end.
void hybridlm_attn_step(const void* q, void* out, int act_bf16, const void* kc, const void* vc, int kv_bf16,
                        const uint8_t* valid, int64_t valid_stride, int64_t b, int64_t h, int64_t h_kv, int64_t S,
                        int64_t s, int64_t dh, float scale, int threads) {
    constexpr int64_t BS = 64;                         // slots per block
    const int64_t g = h / h_kv, nv = (dh + W - 1) / W;
    const int64_t heads = b * h_kv;
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>((2 * threads + heads - 1) / heads, s / 256));
    const int64_t items = heads * parts;
    // per item and query head of its group: running max, running sum, weighted sum of V [dh]
    std::vector<float> m_part(items * g), l_part(items * g), acc_part(items * g * dh), qf(b * h * dh);
    for (int64_t i = 0; i < b * h * dh; ++i) qf[i] = get(q, i, act_bf16) * scale;
    const bool k16 = kv_bf16;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> sc(g * BS);
        std::vector<float> rowf(dh);
        std::vector<vf> krow(nv), qv(g * nv), lanes(g * W);
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; ++it) {
            const int64_t hd = it / parts, part = it % parts, bi = hd / h_kv, kh = hd % h_kv;
            const int64_t per = (s + parts - 1) / parts, t0 = std::min(s, part * per), t1 = std::min(s, t0 + per);
            const float* qg = qf.data() + (bi * h + kh * g) * dh;       // the g query heads of this kv head
            for (int64_t j = 0; j < g; ++j)
                for (int64_t v = 0; v < nv; ++v)
                    qv[j * nv + v] = load(qg + j * dh + v * W, static_cast<int>(std::min<int64_t>(W, dh - v * W)));
            float* m = m_part.data() + it * g;
            float* l = l_part.data() + it * g;
            float* acc = acc_part.data() + it * g * dh;
            for (int64_t j = 0; j < g; ++j) { m[j] = -INFINITY; l[j] = 0.0f; }
            std::fill(acc, acc + g * dh, 0.0f);
            const int64_t base = (bi * h_kv + kh) * S;
            const uint8_t* ok = valid ? valid + bi * valid_stride : nullptr;
            for (int64_t tb = t0; tb < t1; tb += BS) {
                const int64_t nb = std::min(BS, t1 - tb);
                for (int64_t t16 = 0; t16 < nb; t16 += W) {  // scores of the block, W slots at a time
                    const int w = static_cast<int>(std::min<int64_t>(W, nb - t16));
                    for (int t = 0; t < W; ++t) {
                        if (t >= w) {
                            for (int64_t j = 0; j < g; ++j) lanes[j * W + t] = splat(0.0f);
                            continue;
                        }
                        for (int64_t v = 0; v < nv; ++v)
                            krow[v] = loadv(kc, (base + tb + t16 + t) * dh + v * W, k16,
                                            static_cast<int>(std::min<int64_t>(W, dh - v * W)));
                        for (int64_t j = 0; j < g; ++j) {
                            vf a = qv[j * nv] * krow[0];
                            for (int64_t v = 1; v < nv; ++v) a += qv[j * nv + v] * krow[v];
                            lanes[j * W + t] = a;
                        }
                    }
                    for (int64_t j = 0; j < g; ++j) {
                        vf sv = hsum16(lanes.data() + j * W);
                        if (ok)
                            for (int t = 0; t < w; ++t)
                                if (!ok[tb + t16 + t]) sv[t] = -INFINITY;
                        store(sc.data() + j * BS + t16, sv, w);
                    }
                }
                for (int64_t j = 0; j < g; ++j) {             // softmax bookkeeping per query head
                    float* sj = sc.data() + j * BS;
                    float mb = m[j];
                    for (int64_t t = 0; t < nb; ++t) mb = std::max(mb, sj[t]);
                    if (mb == -INFINITY) {                    // nothing visible yet
                        for (int64_t t = 0; t < nb; ++t) sj[t] = 0.0f;
                        continue;
                    }
                    const float corr = std::exp(m[j] - mb);  // 0 when m was -inf
                    m[j] = mb;
                    l[j] *= corr;
                    for (int64_t c = 0; c < dh; ++c) acc[j * dh + c] *= corr;
                    vf lsum = splat(0.0f);
                    for (int64_t t = 0; t < nb; t += W) {
                        const int w = static_cast<int>(std::min<int64_t>(W, nb - t));
                        const vf p = vexp(load(sj + t, w) - mb);
                        vf pz = p;
                        for (int q2 = w; q2 < W; ++q2) pz[q2] = 0.0f;
                        store(sj + t, pz, w);
                        lsum += pz;
                    }
                    l[j] += hsum(lsum);
                }
                // weighted sum of V: register-blocked when dh is 16, 32, 64 or 128, else the generic loop
                const int64_t v0 = (base + tb) * dh;
                if (dh % W == 0 && (k16 ? weighted_v_any(static_cast<const bf16*>(vc) + v0, nv, sc.data(), BS, nb, acc, g)
                                        : weighted_v_any(static_cast<const float*>(vc) + v0, nv, sc.data(), BS, nb, acc, g)))
                    continue;
                for (int64_t t = 0; t < nb; ++t) {
                    for (int64_t v = 0; v < nv; ++v) {
                        const int w = static_cast<int>(std::min<int64_t>(W, dh - v * W));
                        const vf vv = loadv(vc, (base + tb + t) * dh + v * W, k16, w);
                        for (int64_t j = 0; j < g; ++j)
                            store(acc + j * dh + v * W, load(acc + j * dh + v * W, w) + sc[j * BS + t] * vv, w);
                    }
                }
            }
        }
        // merge the runs of each (row, query head)
#pragma omp for schedule(static)
        for (int64_t hq = 0; hq < b * h; ++hq) {
            const int64_t bi = hq / h, hi = hq % h, kh = hi / g, j = hi % g;
            const int64_t it0 = (bi * h_kv + kh) * parts;
            float mx = -INFINITY;
            for (int64_t p = 0; p < parts; ++p) mx = std::max(mx, m_part[(it0 + p) * g + j]);
            float den = 0.0f;
            std::vector<float>& o = rowf;
            std::fill(o.begin(), o.end(), 0.0f);
            if (mx != -INFINITY)
                for (int64_t p = 0; p < parts; ++p) {
                    const float wgt = std::exp(m_part[(it0 + p) * g + j] - mx);
                    den += wgt * l_part[(it0 + p) * g + j];
                    const float* a = acc_part.data() + ((it0 + p) * g + j) * dh;
                    for (int64_t c = 0; c < dh; ++c) o[c] += wgt * a[c];
                }
            for (int64_t c = 0; c < dh; ++c) put(out, hq * dh + c, den > 0.0f ? o[c] / den : 0.0f, act_bf16);
        }
    }
}

// A whole decode step through every layer, for models whose attention layers are full attention
// without positional encoding (Jamba's layout): the per-layer calls above, chained here so Python
// dispatches once per step instead of ~40 times. x [b, d] fp32: the embedded tokens in, the last
// layer's output out (before the final norm). Each layer is described by REC int64 fields (pointers
// as integers; weights as pointers to their Mat), filled by kernels/decode_cpu.py's DecodePlan; `pos`
// is the cache slot of this token.
enum Rec : int64_t {
    // R_CONSTS: a pointer to two floats, the residual multiplier and the attention score scale (0: 1/sqrt(dh))
    R_MIXER, R_FFN, R_NORM1, R_NORM2, R_NORM_BF16, R_CONSTS,
    // Mamba (R_MIXER == 0)
    R_W_IN, R_W_X, R_W_DT, R_W_OUT, R_IN_B, R_OUT_B, R_CONV_W, R_CONV_B, R_DT_LN, R_B_LN, R_C_LN, R_DT_B, R_A, R_D,
    R_CONV, R_CONV_BF16, R_SSM, R_D_IN, R_N, R_R, R_K,
    // attention (R_MIXER == 1) reuses the Mamba slots from R_W_IN on
    R_WQ = R_W_IN, R_WK, R_WV, R_WO, R_KC, R_VC, R_KV_BF16, R_H, R_H_KV, R_S, R_DH,
    // Mamba-2 (R_MIXER == 2) too; R2_LIMS points to two floats, dt's clamp [lo, hi]
    R2_W_IN = R_W_IN, R2_W_OUT, R2_IN_B, R2_OUT_B, R2_CONV_W, R2_CONV_B, R2_DT_B, R2_LIMS, R2_A, R2_D, R2_NORM_W,
    R2_GROUP, R2_CONV, R2_CONV_BF16, R2_SSM, R2_H, R2_P, R2_G, R2_N, R2_K,
    // feed-forward: MLP (R_FFN == 0) or MoE (R_FFN == 1)
    R_F_A = R_K + 1, R_F_B, R_F_C, R_F_D, R_FF, R_E, R_TOPK, R_RENORM,
    // a shared expert (Granite 4.0-H, Nemotron-H) beside the MoE: gate, up, down, width (0: none)
    R_SH_A, R_SH_B, R_SH_C, R_SH_FF,
    REC
};

int64_t hybridlm_decode_rec_len() { return REC; }

void hybridlm_decode_layers(const int64_t* recs, int64_t layers, float* x, const uint8_t* valid, int64_t valid_stride,
                            int64_t pos, int64_t b, int64_t tokens, const int64_t* trails, int64_t d, float eps,
                            int threads) {
    // b state rows x `tokens` tokens each: activation row i is token i % tokens (cache slot pos + that) of
    // cache row i / tokens (a speculative verify chunk; tokens == 1 for a decode step). trails: null, or per
    // layer two pointers (conv inputs [b * tokens, d_in], SSM states before each token [b * tokens, d_in, n];
    // zero for attention layers) that the Mamba layers fill.
    const int64_t rows = b * tokens;
    std::vector<float> h(rows * d), o(rows * d);
    std::vector<float> q, kv, att, logits, qt, at, sh;
    auto P = [](int64_t v) { return reinterpret_cast<void*>(v); };
    for (int64_t li = 0; li < layers; ++li) {
        const int64_t* r = recs + li * REC;
        const int nb = static_cast<int>(r[R_NORM_BF16]);
        auto M = [&](Rec f) { return reinterpret_cast<const Mat*>(r[f]); };
        const float* consts = static_cast<const float*>(P(r[R_CONSTS]));
        const float rm = consts[0];
        hybridlm_rmsnorm(x, h.data(), 0, P(r[R_NORM1]), nb, eps, rows, d, 1);
        if (r[R_MIXER] == 2) {    // Mamba-2: one token per row (the Python side sends no verify chunks)
            const float* lims = static_cast<const float*>(P(r[R2_LIMS]));
            hybridlm_mamba2_step(h.data(), o.data(), 0, M(R2_W_IN), M(R2_W_OUT), (const float*)P(r[R2_IN_B]),
                                 (const float*)P(r[R2_OUT_B]), (const float*)P(r[R2_CONV_W]), (const float*)P(r[R2_CONV_B]),
                                 (const float*)P(r[R2_DT_B]), lims[0], lims[1], (const float*)P(r[R2_A]),
                                 (const float*)P(r[R2_D]), (const float*)P(r[R2_NORM_W]), r[R2_GROUP], eps,
                                 P(r[R2_CONV]), static_cast<int>(r[R2_CONV_BF16]), (float*)P(r[R2_SSM]), rows, d,
                                 r[R2_H], r[R2_P], r[R2_G], r[R2_N], r[R2_K], threads);
        } else if (r[R_MIXER] == 0) {
            mamba_tokens(h.data(), o.data(), 0, M(R_W_IN), M(R_W_X), M(R_W_DT), M(R_W_OUT),
                         (const float*)P(r[R_IN_B]), (const float*)P(r[R_OUT_B]), (const float*)P(r[R_CONV_W]),
                         (const float*)P(r[R_CONV_B]), (const float*)P(r[R_DT_LN]), (const float*)P(r[R_B_LN]),
                         (const float*)P(r[R_C_LN]), eps, (const float*)P(r[R_DT_B]), (const float*)P(r[R_A]),
                         (const float*)P(r[R_D]), P(r[R_CONV]), static_cast<int>(r[R_CONV_BF16]),
                         (float*)P(r[R_SSM]), b, tokens, trails ? (float*)P(trails[2 * li]) : nullptr,
                         trails ? (float*)P(trails[2 * li + 1]) : nullptr, d, r[R_D_IN], r[R_N], r[R_R], r[R_K], threads);
        } else {
            const int64_t nh = r[R_H], nkv = r[R_H_KV], S = r[R_S], dh = r[R_DH];
            const bool c16 = r[R_KV_BF16];
            const float scale = consts[1] != 0.0f ? consts[1] : 1.0f / std::sqrt(static_cast<float>(dh));
            q.resize(rows * nh * dh);
            kv.resize(rows * nkv * dh);
            att.resize(rows * nh * dh);
            hybridlm_linear_step(h.data(), 0, M(R_WQ), nullptr, q.data(), rows, d, nh * dh, threads);
            for (int which = 0; which < 2; ++which) {   // K then V of each token into its slot
                hybridlm_linear_step(h.data(), 0, M(which ? R_WV : R_WK), nullptr, kv.data(), rows, d, nkv * dh, threads);
                void* cache = P(which ? r[R_VC] : r[R_KC]);
                for (int64_t i = 0; i < rows; ++i)
                    for (int64_t hk = 0; hk < nkv; ++hk)
                        for (int64_t c = 0; c < dh; ++c)
                            put(cache, ((i / tokens * nkv + hk) * S + pos + i % tokens) * dh + c,
                                kv[(i * nkv + hk) * dh + c], c16);
            }
            if (tokens == 1) {
                hybridlm_attn_step(q.data(), att.data(), 0, P(r[R_KC]), P(r[R_VC]), c16, valid, valid_stride, b, nh,
                                   nkv, S, pos + 1, dh, scale, threads);
            } else {   // token j of every row sees the slots up to its own: one call per token position
                const int64_t w = nh * dh;
                qt.resize(b * w);
                at.resize(b * w);
                for (int64_t j = 0; j < tokens; ++j) {
                    for (int64_t bi = 0; bi < b; ++bi)
                        std::copy(q.data() + (bi * tokens + j) * w, q.data() + (bi * tokens + j + 1) * w, qt.data() + bi * w);
                    hybridlm_attn_step(qt.data(), at.data(), 0, P(r[R_KC]), P(r[R_VC]), c16, valid, valid_stride, b,
                                       nh, nkv, S, pos + j + 1, dh, scale, threads);
                    for (int64_t bi = 0; bi < b; ++bi)
                        std::copy(at.data() + bi * w, at.data() + (bi + 1) * w, att.data() + (bi * tokens + j) * w);
                }
            }
            hybridlm_linear_step(att.data(), 0, M(R_WO), nullptr, o.data(), rows, nh * dh, d, threads);
        }
        for (int64_t i = 0; i < rows * d; ++i) x[i] += rm * o[i];
        hybridlm_rmsnorm(x, h.data(), 0, P(r[R_NORM2]), nb, eps, rows, d, 1);
        if (r[R_FFN] == 0) {
            hybridlm_mlp_step(h.data(), o.data(), 0, M(R_F_A), M(R_F_B), M(R_F_C), rows, d, r[R_FF], threads);
        } else {
            logits.resize(rows * r[R_E]);
            hybridlm_moe_step(h.data(), o.data(), 0, M(R_F_A), (const Mat* const*)P(r[R_F_B]),
                              (const Mat* const*)P(r[R_F_C]), (const Mat* const*)P(r[R_F_D]), logits.data(), rows, d,
                              r[R_FF], r[R_E], r[R_TOPK], static_cast<int>(r[R_RENORM]), threads);
        }
        if (r[R_SH_FF]) {           // the shared expert reads the same normed input; its output adds to the MoE's
            sh.resize(rows * d);
            hybridlm_mlp_step(h.data(), sh.data(), 0, M(R_SH_A), M(R_SH_B), M(R_SH_C), rows, d, r[R_SH_FF], threads);
            for (int64_t i = 0; i < rows * d; ++i) o[i] += sh[i];
        }
        for (int64_t i = 0; i < rows * d; ++i) x[i] += rm * o[i];
    }
}

}  // extern "C"
