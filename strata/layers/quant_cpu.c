/* AVX-512 CPU kernels for Strata's quantized weight formats (see docs/quantization.md).
 *
 * Loaded through ctypes by strata/layers/quant_native.py, which compiles this file once per machine.
 * Threads come from OpenMP; because torch is imported first, this library binds to torch's libgomp and
 * obeys torch.set_num_threads.
 *
 * Two kinds of entry points, all taking bf16 activations and writing bf16:
 *   gemv_*     y[M, N] = x[M, K] @ dequant(W)^T (+ bias) for small M, reading each weight byte once per
 *              group of 4 activation rows. Memory-bound by design.
 *   dequant_*  rows [n0, n1) of W into a bf16 buffer, for the batched path (buffer then goes to a bf16
 *              matmul). int8 and fp8 leave the per-channel scale out (the caller scales the output).
 *
 * Weight layouts are the on-disk ones: int8 [N, K] signed; fp8 e4m3 [N, K]; nested int8 [N, Kp] unsigned
 * with value (b - 136) * scale[n, k / G]; int4 [N, Kp / 2] with element 2j in the low nibble of byte j and
 * value (q - zero) * scale[n, k / G] (zero = 8 when symmetric). Group scales are fp16, row scales fp32.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MB 4 /* activation rows handled per pass over the weights */
#define PAR_MIN_WORK (1 << 18) /* below this many weight bytes, threading costs more than it saves */

int strata_qk_abi(void) { return 3; }

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

static inline void store_out(uint16_t *y, int64_t ldy, int m, int64_t n, float v, const float *bias) {
    y[m * ldy + n] = f32_to_bf16(bias ? v + bias[n] : v);
}

/* ---------------------------------------------------------------- 8-bit GEMV (int8, fp8, nested) */

enum { K_I8 = 0, K_F8 = 1, K_U8 = 2 };

/* 16 weight bytes -> 16 floats. fp8 e4m3 becomes fp16 bits by a shift (exact, subnormals included) and is
 * 1/256 of the true value; the caller folds the 256 into the row scale. */
static inline __attribute__((always_inline)) __m512 load16(int kind, const uint8_t *p, __mmask16 m) {
    __m128i b = _mm_maskz_loadu_epi8(m, p);
    if (kind == K_I8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    if (kind == K_U8) return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
    __m256i h = _mm256_cvtepi8_epi16(b);
    h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xBF80));
    return _mm512_cvtph_ps(h);
}

/* acc[m] += x[m, k:k+16] * w[k:k+16] (optionally times the group scale), 4 independent chains per row. */
static inline __attribute__((always_inline)) void row_dot8(int kind, int mb, const uint8_t *w, int64_t K,
                                                           const float *xf, int64_t ldx, int G,
                                                           const uint16_t *gscale, float *out) {
    __m512 acc[MB][4];
    for (int m = 0; m < mb; m++)
        for (int u = 0; u < 4; u++) acc[m][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        for (int u = 0; u < 4; u++) {
            __m512 wv = load16(kind, w + k + 16 * u, 0xFFFF);
            if (gscale) wv = _mm512_mul_ps(wv, _mm512_set1_ps(f16_to_f32(gscale[(k + 16 * u) / G])));
            for (int m = 0; m < mb; m++)
                acc[m][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xf + m * ldx + k + 16 * u), acc[m][u]);
        }
    }
    for (; k < K; k += 16) {
        __mmask16 mask = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 wv = load16(kind, w + k, mask);
        if (gscale) wv = _mm512_mul_ps(wv, _mm512_set1_ps(f16_to_f32(gscale[k / G])));
        for (int m = 0; m < mb; m++)
            acc[m][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, xf + m * ldx + k), acc[m][0]);
    }
    for (int m = 0; m < mb; m++)
        out[m] = _mm512_reduce_add_ps(
            _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3])));
}

/* Shared driver. kind K_I8/K_F8: per-row fp32 scale, no groups. K_U8: fp16 group scales, offset 136. */
static void gemv8(int kind, const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int G,
                  const void *scale, const float *bias, uint16_t *y) {
    int64_t ng = kind == K_U8 ? K / G : 1;
    float *xf = malloc(sizeof(float) * (size_t)(MB * K + MB * ng));
    float *xs = xf + MB * K; /* per-group sums of x, for the nested offset */
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        int mb = M - m0 < MB ? (int)(M - m0) : MB;
        for (int m = 0; m < mb; m++) {
            for (int64_t k = 0; k < K; k++) xf[m * K + k] = bf16_to_f32(x[(m0 + m) * K + k]);
            if (kind == K_U8)
                for (int64_t g = 0; g < ng; g++) {
                    float s = 0;
                    for (int64_t k = g * G; k < (g + 1) * G; k++) s += xf[m * K + k];
                    xs[m * ng + g] = s;
                }
        }
#pragma omp parallel for schedule(static) if (N * K * mb > PAR_MIN_WORK)
        for (int64_t n = 0; n < N; n++) {
            float r[MB];
            const uint8_t *wr = w + n * K;
            const uint16_t *gs = kind == K_U8 ? (const uint16_t *)scale + n * ng : NULL;
            switch (mb) { /* constant mb lets the compiler keep the accumulators in registers */
            case 1: row_dot8(kind, 1, wr, K, xf, K, G, gs, r); break;
            case 2: row_dot8(kind, 2, wr, K, xf, K, G, gs, r); break;
            case 3: row_dot8(kind, 3, wr, K, xf, K, G, gs, r); break;
            default: row_dot8(kind, 4, wr, K, xf, K, G, gs, r); break;
            }
            for (int m = 0; m < mb; m++) {
                float v;
                if (kind == K_U8) {
                    float c = 0;
                    for (int64_t g = 0; g < ng; g++) c += f16_to_f32(gs[g]) * xs[m * ng + g];
                    v = r[m] - 136.0f * c;
                } else {
                    v = r[m] * ((const float *)scale)[n] * (kind == K_F8 ? 256.0f : 1.0f);
                }
                store_out(y + m0 * N, N, m, n, v, bias);
            }
        }
    }
    free(xf);
}

void gemv_int8(const uint16_t *x, int64_t M, int64_t K, const int8_t *w, int64_t N, const float *scale,
               const float *bias, uint16_t *y) {
    gemv8(K_I8, x, M, K, (const uint8_t *)w, N, 0, scale, bias, y);
}

void gemv_fp8(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *scale,
              const float *bias, uint16_t *y) {
    gemv8(K_F8, x, M, K, w, N, 0, scale, bias, y);
}

/* nested int8: x is [M, Kp] (zero-padded by the caller), w [N, Kp], scale fp16 [N, Kp / G] */
void gemv_nested(const uint16_t *x, int64_t M, int64_t Kp, const uint8_t *w, int64_t N, int64_t G,
                 const uint16_t *scale, const float *bias, uint16_t *y) {
    gemv8(K_U8, x, M, Kp, w, N, (int)G, scale, bias, y);
}

/* ---------------------------------------------------------------- int4 GEMV */

/* A nibble q in a 16-bit lane becomes the bf16 number 128 + q by OR-ing in 0x4300 (exact). The dot product
 * then runs on vdpbf16ps, and sum(x * (q - z)) = dot(x, 128 + q) - (128 + z) * sum(x) per group. Bytes hold
 * elements (2j, 2j+1) in (low, high) nibble, so x is pre-split per 64-block into even and odd halves. */
static inline __attribute__((always_inline)) void row_dot4(int mb, const uint8_t *w, int64_t nbytes, int G,
                                                           const float *sc, const uint16_t *xp, int64_t ldx,
                                                           float *out) {
    const __m512i lomask = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
    __m512 tot[MB][2];
    for (int m = 0; m < mb; m++) tot[m][0] = tot[m][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b * 32 < nbytes; b++) {
        /* 64 elements span groups g0 (elements 0..31) and g1 (32..63); equal unless G == 32. With G == 32
         * the last block may be half empty: its high bytes load as zero, and sc[ng] == 0 scales them. */
        int64_t g0 = (b * 64) / G, g1 = (b * 64 + 32) / G;
        __mmask32 lm = b * 32 + 32 <= nbytes ? 0xFFFFFFFFu : 0xFFFFu;
        __m512 sv = _mm512_mask_mov_ps(_mm512_set1_ps(sc[g0]), 0xFF00, _mm512_set1_ps(sc[g1]));
        __m512i q = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(lm, w + b * 32));
        __m512i lo = _mm512_ternarylogic_epi32(q, lomask, magic, 0xEA); /* (q & 0xF) | 0x4300 */
        __m512i hi = _mm512_or_si512(_mm512_srli_epi16(q, 4), magic);
        for (int m = 0; m < mb; m++) {
            const uint16_t *xb = xp + m * ldx + b * 64;
            __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)lo,
                                          (__m512bh)_mm512_loadu_si512(xb));
            acc = _mm512_dpbf16_ps(acc, (__m512bh)hi, (__m512bh)_mm512_loadu_si512(xb + 32));
            tot[m][b & 1] = _mm512_fmadd_ps(acc, sv, tot[m][b & 1]);
        }
    }
    for (int m = 0; m < mb; m++) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(tot[m][0], tot[m][1]));
}

/* x [M, Kp] bf16 zero-padded; w [N, Kp / 2]; scale fp16 [N, Kp / G]; zeros uint8 [N, Kp / G] or NULL */
void gemv_int4(const uint16_t *x, int64_t M, int64_t Kp, const uint8_t *w, int64_t N, int64_t G,
               const uint16_t *scale, const uint8_t *zeros, const float *bias, uint16_t *y) {
    int64_t ng = Kp / G, nbytes = Kp / 2, kx = (Kp + 63) / 64 * 64;
    uint16_t *xp = calloc((size_t)(MB * kx), sizeof(uint16_t));
    float *xs = malloc(sizeof(float) * (size_t)(MB * ng));
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        int mb = M - m0 < MB ? (int)(M - m0) : MB;
        for (int m = 0; m < mb; m++) {
            const uint16_t *xr = x + (m0 + m) * Kp;
            for (int64_t k = 0; k < Kp; k++) /* even elements first, then odd, within each 64-block */
                xp[m * kx + (k / 64) * 64 + (k % 64) / 2 + (k % 2) * 32] = xr[k];
            for (int64_t g = 0; g < ng; g++) {
                float s = 0;
                for (int64_t k = g * G; k < (g + 1) * G; k++) s += bf16_to_f32(xr[k]);
                xs[m * ng + g] = s;
            }
        }
#pragma omp parallel if (N * nbytes * mb > PAR_MIN_WORK)
        {
            float *sc = malloc(sizeof(float) * (size_t)(ng + 1));
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) {
                float r[MB];
                for (int64_t g = 0; g < ng; g++) sc[g] = f16_to_f32(scale[n * ng + g]);
                sc[ng] = 0.0f;
                const uint8_t *wr = w + n * nbytes;
                switch (mb) {
                case 1: row_dot4(1, wr, nbytes, (int)G, sc, xp, kx, r); break;
                case 2: row_dot4(2, wr, nbytes, (int)G, sc, xp, kx, r); break;
                case 3: row_dot4(3, wr, nbytes, (int)G, sc, xp, kx, r); break;
                default: row_dot4(4, wr, nbytes, (int)G, sc, xp, kx, r); break;
                }
                for (int m = 0; m < mb; m++) {
                    float c = 0;
                    for (int64_t g = 0; g < ng; g++)
                        c += sc[g] * (128.0f + (zeros ? (float)zeros[n * ng + g] : 8.0f)) * xs[m * ng + g];
                    store_out(y + m0 * N, N, m, n, r[m] - c, bias);
                }
            }
            free(sc);
        }
    }
    free(xp);
    free(xs);
}

/* ---------------------------------------------------------------- dequantize to bf16 (batched path) */

/* rows [n0, n1) -> out [n1 - n0, K]. int8: the integer values; fp8: value / 256; nested: the true value. */
static void dequant8(int kind, const uint8_t *w, int64_t K, int G, const uint16_t *scale, int64_t n0,
                     int64_t n1, uint16_t *out) {
#pragma omp parallel for schedule(static) if ((n1 - n0) * K > PAR_MIN_WORK)
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * K;
        uint16_t *o = out + (n - n0) * K;
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 mask = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            __m512 v = load16(kind, wr + k, mask);
            if (kind == K_U8) {
                __m512 s = _mm512_set1_ps(f16_to_f32(scale[n * (K / G) + k / G]));
                v = _mm512_mul_ps(_mm512_sub_ps(v, _mm512_set1_ps(136.0f)), s);
            }
            _mm256_mask_storeu_epi16(o + k, mask, (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

void dequant_int8(const int8_t *w, int64_t K, int64_t n0, int64_t n1, uint16_t *out) {
    dequant8(K_I8, (const uint8_t *)w, K, 1, NULL, n0, n1, out);
}

void dequant_fp8(const uint8_t *w, int64_t K, int64_t n0, int64_t n1, uint16_t *out) {
    dequant8(K_F8, w, K, 1, NULL, n0, n1, out);
}

void dequant_nested(const uint8_t *w, int64_t Kp, int64_t G, const uint16_t *scale, int64_t n0, int64_t n1,
                    uint16_t *out) {
    dequant8(K_U8, w, Kp, (int)G, scale, n0, n1, out);
}

/* int4 rows [n0, n1) -> out [n1 - n0, Kp]: per group a 16-entry bf16 table (q - z) * s, indexed by vpermw */
void dequant_int4(const uint8_t *w, int64_t Kp, int64_t G, const uint16_t *scale, const uint8_t *zeros,
                  int64_t n0, int64_t n1, uint16_t *out) {
    int64_t ng = Kp / G;
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i nib = _mm512_set1_epi32(0x000F000F);
#pragma omp parallel for schedule(static) if ((n1 - n0) * Kp > PAR_MIN_WORK)
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (Kp / 2);
        uint16_t *o = out + (n - n0) * Kp;
        for (int64_t g = 0; g < ng; g++) {
            float s = f16_to_f32(scale[n * ng + g]);
            float z = zeros ? (float)zeros[n * ng + g] : 8.0f;
            __m512i lut = _mm512_castsi256_si512(
                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(s))));
            for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
                __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wr + k / 2)));
                /* dword j = byte j: low nibble to 16-bit lane 2j, high nibble to lane 2j + 1 */
                d = _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 12), nib, 0xA8);
                _mm512_storeu_si512(o + k, _mm512_permutexvar_epi16(d, lut));
            }
        }
    }
}
