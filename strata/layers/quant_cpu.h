/* Shared definitions of Strata's AVX-512 quantized-weight kernels (see docs/quantization.md).
 *
 * quant_cpu_gemv8.c, quant_cpu_gemv4.c, quant_cpu_gemv16.c (plain bf16 weights) and quant_cpu_dequant.c include
 * this header; quant_native.py compiles them into one library once per machine and loads it through ctypes.
 * Threads come from OpenMP; because torch is imported first, this library binds to torch's libgomp and
 * obeys torch.set_num_threads.
 *
 * Three kinds of entry points, all taking bf16 activations and writing bf16:
 *   gemv_*     y[M, N] = x[M, K] @ dequant(W)^T (+ bias) for small M, reading each weight byte once per
 *              group of 4 activation rows. Memory-bound by design.
 *   gemm_dq    the same product for more rows (quant_cpu_gemm.c): tiles of W dequantized into cache, then a
 *              bf16 GEMM on them.
 *   dequant_*  rows [n0, n1) of W into a bf16 buffer, scales applied, for gemm_dq and for the batched path
 *              of many rows (the buffer then goes to a bf16 matmul).
 *
 * Weight layouts are the on-disk ones: int8 [N, K] signed; fp8 e4m3 [N, K]; nested int8 [N, Kp] unsigned
 * with value (b - 136) * scale[n, k / G]; int4 [N, Kp / 2] with element 2j in the low nibble of byte j and
 * value (q - zero) * scale[n, k / G] (zero = 8 when symmetric). Group scales are fp16, row scales fp32.
 */
#ifndef STRATA_QUANT_CPU_H
#define STRATA_QUANT_CPU_H

#include <immintrin.h>
#ifdef __AVX512F__
#define AS_BH(x) ((__m512bh)(x)) /* 32 bf16 for vdpbf16ps (nothing under quant_cpu_avx2.h) */
#else
#include "quant_cpu_avx2.h" /* the same kernels on AVX2, FMA and F16C */
#endif
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MB 4 /* activation rows handled per pass over the weights */
#define MB16 8 /* the same for gemv_bf16 (quant_cpu_gemv16.c) */
/* bf16 weights up to this size (one L2) run gemv_bf16 at up to GEMV_BF16_MAX_ROWS rows (two passes of MB16 over a
 * weight that stays in cache), larger ones the GEMM (gemv_once in cpu_moe.c; layers/linear.py's GEMV_BF16_MAX_BYTES
 * and GEMV_BF16_MAX_ROWS must equal them) */
#define GEMV_BF16_MAX_BYTES (1 << 20)
#define GEMV_BF16_MAX_ROWS (2 * MB16)
#define PAR_MIN_WORK (1 << 18) /* below this many weight bytes, threading costs more than it saves */
/* PREFETCH: the GEMVs walk R weight rows side by side, a few KiB each, so the hardware prefetcher has to
 * find R new streams at every block. Each load therefore prefetches the same cache line of the next block's
 * row (R rows further): measured 1.5x faster DRAM-bound on one Zen 5 core than no or short-distance prefetch.
 * Prefetches past the end of the matrix are harmless (they never fault). */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; weights and activations are finite */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

static inline float half_at(const uint8_t *p) { /* an fp16 number inside a GGUF block (unaligned) */
    uint16_t h;
    memcpy(&h, p, 2);
    return f16_to_f32(h);
}

static inline void store_out(uint16_t *y, int64_t ldy, int m, int64_t n, float v, const float *bias) {
    y[m * ldy + n] = f32_to_bf16(bias ? v + bias[n] : v);
}

/* for (i = 0; i < n; i++) BODY, by an OpenMP team when par is nonzero, else as a plain loop. `omp parallel for
 * if (0)` still enters the OpenMP runtime (a team of one, about 0.5 us a call): a decode step of a small model
 * makes hundreds of such calls, whose work is a few microseconds each. Inside a team (moe_decode_batch runs its
 * experts on the threads) the loop runs plainly in the calling thread. */
#define PAR_FOR(par, i, n, ...)                                                                                 \
    do {                                                                                                        \
        if ((par) && !omp_in_parallel()) {                                                                      \
            _Pragma("omp parallel for schedule(static)") for (int64_t i = 0; i < (n); i++) __VA_ARGS__          \
        } else {                                                                                                \
            for (int64_t i = 0; i < (n); i++) __VA_ARGS__                                                       \
        }                                                                                                       \
    } while (0)

/* ---------------------------------------------------------------- shared helpers */

/* v[i] holds 16 partial sums of key i; returns the vector whose lane i is the full sum of v[i]. Four levels of
 * pairwise (permute, permute, add): each halves the partials per key and doubles the keys per vector. Lane j is
 * added to lane j + 8, then j + 4, j + 2, j + 1: the order of _mm512_reduce_add_ps, so each sum is the one it
 * gives, for a third of its instructions. */
static inline __m512 sum16(__m512 v[16]) {
#ifndef __AVX512F__
    return s5_sum16(v); /* the same sums through 256-bit shuffles (quant_cpu_avx2.h) */
#endif
    static const int lo[4][16] = {
        {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
        {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
        {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
        {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
    };
    static const int step[4] = {8, 4, 2, 1};
    int n = 16;
    for (int l = 0; l < 4; l++) {
        __m512i il = _mm512_loadu_si512(lo[l]);
        __m512i ih = _mm512_add_epi32(il, _mm512_set1_epi32(step[l]));
        for (int i = 0; i < n / 2; i++)
            v[i] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * i], il, v[2 * i + 1]),
                                 _mm512_permutex2var_ps(v[2 * i], ih, v[2 * i + 1]));
        n /= 2;
    }
    return v[0];
}

static inline __mmask16 tail16(int64_t n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); }

/* 16 bf16 values (lanes outside m read as 0) -> fp32 */
static inline __m512 bf16x16_load(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* round each lane to the nearest bf16 (ties to even), kept in fp32: emulates one bf16 torch op */
static inline __m512 bf16_round_ps(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

/* kernels compiled for both element types (F32 a compile-time constant: bf16 when 0, fp32 when 1): 16 values from
 * element i of p (lanes outside m read as 0) widened to fp32; 16 fp32 values stored as element i on (lanes in m) */
static inline __attribute__((always_inline)) __m512 load16_any(const int F32, const void *p, int64_t i, __mmask16 m) {
    return F32 ? _mm512_maskz_loadu_ps(m, (const float *)p + i) : bf16x16_load((const uint16_t *)p + i, m);
}

static inline __attribute__((always_inline)) void store16_any(const int F32, void *p, int64_t i, __mmask16 m,
                                                              __m512 v) {
    if (F32)
        _mm512_mask_storeu_ps((float *)p + i, m, v);
    else
        _mm256_mask_storeu_epi16((uint16_t *)p + i, m, (__m256i)_mm512_cvtneps_pbh(v));
}

/* e^x: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, Taylor degree 6 (relative error about 1e-7, at fp32
 * rounding); inputs are clamped to [-87, 88] */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* fp16 group scales of one row -> fp32 sc[0..ng), plus sc[ng] = 0 (see row_dot4) */
static inline void row_scales(const uint16_t *s16, int64_t ng, float *sc) {
    for (int64_t g = 0; g < ng; g += 16) {
        __mmask16 mk = tail16(ng - g);
        _mm512_mask_storeu_ps(sc + g, mk, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, s16 + g)));
    }
    sc[ng] = 0.0f;
}

/* sum_g sc[g] * (base + z[g]) * xs[g], with z[g] = zdef when z is NULL */
static inline float group_corr(const float *sc, const uint8_t *z, float base, float zdef, const float *xs,
                               int64_t ng) {
    __m512 c = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g += 16) {
        __mmask16 mk = tail16(ng - g);
        __m512 zz = z ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, z + g)))
                      : _mm512_set1_ps(zdef);
        zz = _mm512_add_ps(zz, _mm512_set1_ps(base));
        c = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, sc + g), zz), _mm512_maskz_loadu_ps(mk, xs + g), c);
    }
    return _mm512_reduce_add_ps(c);
}

/* per-group sums of x (fp32), the right-hand side of every offset correction */
static inline void group_sums(const float *xf, int64_t K, int64_t G, float *xs) {
    for (int64_t g = 0; g * G < K; g++) {
        float s = 0;
        for (int64_t k = g * G; k < (g + 1) * G && k < K; k++) s += xf[k];
        xs[g] = s;
    }
}

/* ---------------------------------------------------------------- 8-bit codes through fp16 (dequant, nested GEMV) */

enum { K_I8 = 0, K_F8 = 1, K_U8 = 2 };
#define OFF_I8 1152.0f /* int8 v is read as the fp16 number 1024 + (v + 128) */
#define OFF_U8 1024.0f /* nested byte b is read as 1024 + b */

/* 16 weight bytes -> 16 floats through fp16 bit patterns and vcvtph2ps (cheaper here than vpmovsxbd +
 * vcvtdq2ps). int8 gives v + 1152, nested b + 1024 (callers subtract the offset); fp8 e4m3 shifted into
 * fp16 is exact, subnormals included, and equals 1/256 of the true value. Used by the dequantizers and the
 * nested GEMV; the int8 and fp8 GEMVs below use bf16 dot products instead. */
static inline __attribute__((always_inline)) __m512 load16(int kind, const uint8_t *p, __mmask16 m) {
    __m128i b = m == 0xFFFF ? _mm_loadu_si128((const __m128i *)p) : _mm_maskz_loadu_epi8(m, p);
    __m256i h;
    if (kind == K_F8) {
        h = _mm256_cvtepi8_epi16(b);
        h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xBF80));
    } else {
        h = _mm256_cvtepu8_epi16(b); /* imm 0xBE: (A ^ B) | C */
        h = kind == K_I8 ? _mm256_ternarylogic_epi32(h, _mm256_set1_epi16(0x80), _mm256_set1_epi16(0x6400), 0xBE)
                         : _mm256_or_si256(h, _mm256_set1_epi16(0x6400));
    }
    return _mm512_cvtph_ps(h);
}

/* out[r][m] = sum_k x[m, k] * load16(w_r)[k] (times the group scale sc[r * lds + k / G] when sc is given)
 * for R consecutive weight rows: each x load serves R rows, which keeps several x rows (M > 1) from
 * streaming out of L1 once per weight row. U chains per (row, x row) hide the FMA latency when R * mb is 1. */

#define RB 4 /* weight rows per block in the GEMVs: each x load serves RB rows */

/* Calls CALL(1) .. CALL(4) for a runtime mb, so every kernel is compiled with a constant number of x rows
 * and keeps its accumulators in registers. */
#define SWITCH_MB(mb, CALL)                                                                                     \
    switch (mb) {                                                                                               \
    case 1: CALL(1); break;                                                                                     \
    case 2: CALL(2); break;                                                                                     \
    case 3: CALL(3); break;                                                                                     \
    default: CALL(4); break;                                                                                    \
    }

/* ---------------------------------------------------------------- entry points used across files */

void gemv_bf16(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias, void *y,
               int64_t out_f32);
/* the AVX2 build's gemv_bf16: weights widened to fp32 once per load (quant_cpu_gemv16_avx2.c) */
void gemv_bf16_avx2(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias, void *y,
                    int64_t out_f32);
void gemv_int8(const uint16_t *x, int64_t M, int64_t K, const int8_t *w, int64_t N, const float *scale,
               const float *bias, uint16_t *y);
void gemv_fp8(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *scale,
              const float *bias, uint16_t *y);
void gemv_nested(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t G,
                 const uint16_t *scale, const float *bias, uint16_t *y);
void gemv_int4(const uint16_t *x, int64_t M, int64_t Kp, const uint8_t *w, int64_t N, int64_t G,
               const uint16_t *scale, const uint8_t *zeros, const float *bias, uint16_t *y);
/* K-quant blocks as in GGUF (quant_cpu_kquant.c); kind 0 q4_k, 1 q5_k, 2 q6_k */
void gemv_kq(int64_t kind, const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
             const float *bias, uint16_t *y);
/* Q8_0 / Q4_1 blocks as in GGUF (quant_cpu_q32.c); kind 0 q8_0, 1 q4_1 */
void gemv_qb(int64_t kind, const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
             const float *bias, uint16_t *y);
/* the AVX2 build's GEMV of those blocks, fp32 arithmetic (quant_cpu_q32_avx2.c); f32: x and y fp32, else bf16
 * (then on int16 activations, quant_cpu_q32x16_avx2.c) */
void qb_gemv_avx2(int kind, int f32, const void *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
                  const float *bias, void *y);
/* the same for bf16 x and y, on int16 activations (quant_cpu_q32x16_avx2.c) */
void qb_gemv_x16_avx2(int kind, const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
                      const float *bias, uint16_t *y);
/* gemv_int4 on AVX2 for G a multiple of 32, on int16 activations (quant_cpu_q32x16_avx2.c) */
void int4_gemv_x16_avx2(const uint16_t *x, int64_t M, int64_t Kp, const uint8_t *w, int64_t N, int64_t G,
                        const uint16_t *scale, const uint8_t *zeros, const float *bias, uint16_t *y);
/* gemv_int8 on AVX2 for K a multiple of 32, on int16 activations (quant_cpu_q32x16_avx2.c) */
void int8_gemv_x16_avx2(const uint16_t *x, int64_t M, int64_t K, const int8_t *w, int64_t N, const float *scale,
                        const float *bias, uint16_t *y);
/* gemv_kq on AVX2, on int16 activations (quant_cpu_q32x16_avx2.c) */
void kq_gemv_x16_avx2(int kind, const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
                      const float *bias, uint16_t *y);
/* gemv_fp8 on AVX2 for K a multiple of 16: codes widened through F16C (quant_cpu_gemv16_avx2.c) */
void fp8_gemv_avx2(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *scale,
                   const float *bias, uint16_t *y);
/* below this many q.k multiply-adds one thread is faster than a fork/join; at 1 << 15 the bundled model's 16 sequences
 * (about 140K) split over two threads took 0.94x the step of 1 << 20 (benchmarks/decode_step.py --threads 2) */
#define PAR_MIN_ATTN (1 << 15)

/* decode attention on AVX2 for head sizes that are multiples of 16 (cpu_decode_attention_avx2.c); par: threads */
void decode_attention_avx2(const uint16_t *q, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, const uint16_t *kc,
                           const uint16_t *vc, const int64_t *slots, const int64_t *starts, float scale,
                           uint16_t *out, int64_t par);
void decode_attention_avx2_f32(const float *q, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, const float *kc,
                               const float *vc, const int64_t *slots, const int64_t *starts, float scale, float *out,
                               int64_t par);
/* rows [n0, n1) of a weight -> bf16 [n1 - n0, K], scales applied (quant_cpu_dequant.c, _kquant.c, _q32.c) */
void dequant_int8(const int8_t *w, int64_t K, const float *scale, int64_t n0, int64_t n1, uint16_t *out);
void dequant_fp8(const uint8_t *w, int64_t K, const float *scale, int64_t n0, int64_t n1, uint16_t *out);
void dequant_nested(const uint8_t *w, int64_t Kp, int64_t G, const uint16_t *scale, int64_t n0, int64_t n1,
                    uint16_t *out);
void dequant_int4(const uint8_t *w, int64_t Kp, int64_t G, const uint16_t *scale, const uint8_t *zeros,
                  int64_t n0, int64_t n1, uint16_t *out);
void dequant_int4_f32(const uint8_t *w, int64_t Kp, int64_t G, const uint16_t *scale, const uint8_t *zeros,
                      int64_t n0, int64_t n1, float *out);
void dequant_kq(int64_t kind, const uint8_t *w, int64_t K, int64_t n0, int64_t n1, uint16_t *out);
void dequant_qb(int64_t kind, const uint8_t *w, int64_t K, int64_t n0, int64_t n1, uint16_t *out);
/* M bf16 rows through a weight of kind WK_* (cpu_moe.c); WK_Q4K + k is K-quant kind k, WK_Q8_0 + k block kind k */
enum { WK_BF16 = 0, WK_INT8 = 1, WK_FP8 = 2, WK_NESTED = 3, WK_INT4 = 4, WK_Q4K = 5, WK_Q5K = 6, WK_Q6K = 7,
       WK_Q8_0 = 8, WK_Q4_1 = 9, WK_Q5_0 = 10, WK_Q5_1 = 11 };
void strata_gemv(int kind, const uint16_t *x, int64_t M, int64_t K, const void *w, const void *s, const void *z,
                 int64_t N, int64_t G, uint16_t *y);
/* the same product for more rows: weight tiles dequantized to bf16 in cache, bf16 GEMM on them (quant_cpu_gemm.c) */
void gemm_dq(int64_t kind, const uint16_t *x, int64_t M, int64_t K, const void *w, const void *s, const void *z,
             int64_t N, int64_t G, const float *bias, uint16_t *y);
/* strata_gemv that reads the weight from memory once for any M (tiles of rows kept in cache across row groups) */
void gemv_once(int kind, const uint16_t *x, int64_t M, int64_t K, const void *w, const void *s, const void *z,
               int64_t N, int64_t G, uint16_t *y);
void silu_mul_bf16(const uint16_t *gu, int64_t I, uint16_t *act);
void rms_norm_bf16(const uint16_t *x, const uint16_t *res, const uint16_t *w, int64_t T, int64_t H, float eps,
                   uint16_t *out, uint16_t *res_out);
void rope_bf16(const uint16_t *x, int64_t T, int64_t H, int64_t D, int64_t stride_t, const uint16_t *cos,
               const uint16_t *sin, uint16_t *out);
void decode_attention_bf16(const uint16_t *q, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, const uint16_t *kc,
                           const uint16_t *vc, const int64_t *slots, const int64_t *starts, float scale,
                           uint16_t *out);
/* the same for a float32 model's activations (fp32 in and out) */
void silu_mul_f32(const float *gu, int64_t I, float *act);
void rms_norm_f32(const float *x, const float *res, const float *w, int64_t T, int64_t H, float eps, float *out,
                  float *res_out);
void rope_f32(const float *x, int64_t T, int64_t H, int64_t D, int64_t stride_t, const float *cos, const float *sin,
              float *out);
void decode_attention_f32(const float *q, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, const float *kc,
                          const float *vc, const int64_t *slots, const int64_t *starts, float scale, float *out);
void gemv_qb_f32(int64_t kind, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias,
                 float *y);
void gemv_once_f32(int kind, const float *x, int64_t M, int64_t K, const void *w, const void *s, const void *z,
                   int64_t N, int64_t G, float *y, uint16_t *xb, uint16_t *yb);

#endif
