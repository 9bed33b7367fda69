/* AVX-512 CPU kernels for Strata's quantized weight formats (see docs/quantization.md).
 *
 * Loaded through ctypes by strata/layers/quant_native.py, which compiles this file once per machine.
 * Threads come from OpenMP; because torch is imported first, this library binds to torch's libgomp and
 * obeys torch.set_num_threads.
 *
 * Two kinds of entry points, all taking bf16 activations and writing bf16:
 *   gemv_*     y[M, N] = x[M, K] @ dequant(W)^T (+ bias) for small M, reading each weight byte once per
 *              group of 4 activation rows. Memory-bound by design.
 *   dequant_*  rows [n0, n1) of W into a bf16 buffer, scales applied, for the batched path (the buffer
 *              then goes to a bf16 matmul).
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

/* ---------------------------------------------------------------- shared helpers */

static inline __mmask16 tail16(int64_t n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); }

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
static void group_sums(const float *xf, int64_t K, int64_t G, float *xs) {
    for (int64_t g = 0; g * G < K; g++) {
        float s = 0;
        for (int64_t k = g * G; k < (g + 1) * G && k < K; k++) s += xf[k];
        xs[g] = s;
    }
}

/* ---------------------------------------------------------------- 8-bit GEMV (int8, fp8, nested) */

enum { K_I8 = 0, K_F8 = 1, K_U8 = 2 };
#define OFF_I8 1152.0f /* int8 v is read as the fp16 number 1024 + (v + 128) */
#define OFF_U8 1024.0f /* nested byte b is read as 1024 + b */

/* 16 weight bytes -> 16 floats through fp16 bit patterns and vcvtph2ps (cheaper here than vpmovsxbd +
 * vcvtdq2ps). int8 gives v + 1152, nested b + 1024 (the caller subtracts offset * sum(x)); fp8 e4m3 shifted
 * into fp16 is exact, subnormals included, and equals 1/256 of the true value. */
static inline __attribute__((always_inline)) __m512 load16(int kind, const uint8_t *p, __mmask16 m) {
    __m128i b = _mm_maskz_loadu_epi8(m, p);
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

/* out[m] = sum_k x[m, k] * load16(w)[k] (times sc[k / G] when sc is given). U independent chains per row. */
static inline __attribute__((always_inline)) void row_dot8(int kind, int mb, const uint8_t *w, int64_t K,
                                                           const float *xf, int64_t ldx, int gsh,
                                                           const float *sc, float *out) {
    enum { U = 4 };
    const int u_used = mb == 1 ? 4 : 2; /* fewer chains when several x rows already give parallelism */
    __m512 acc[MB][U];
    for (int m = 0; m < mb; m++)
        for (int u = 0; u < U; u++) acc[m][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 * u_used <= K; k += 16 * u_used) {
        for (int u = 0; u < u_used; u++) {
            __m512 wv = load16(kind, w + k + 16 * u, 0xFFFF);
            if (sc) wv = _mm512_mul_ps(wv, _mm512_set1_ps(sc[(k + 16 * u) >> gsh]));
            for (int m = 0; m < mb; m++)
                acc[m][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xf + m * ldx + k + 16 * u), acc[m][u]);
        }
    }
    for (; k < K; k += 16) {
        __mmask16 mask = tail16(K - k);
        __m512 wv = load16(kind, w + k, mask);
        if (sc) wv = _mm512_mul_ps(wv, _mm512_set1_ps(sc[k >> gsh]));
        for (int m = 0; m < mb; m++)
            acc[m][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, xf + m * ldx + k), acc[m][0]);
    }
    for (int m = 0; m < mb; m++) {
        __m512 t = acc[m][0];
        for (int u = 1; u < u_used; u++) t = _mm512_add_ps(t, acc[m][u]);
        out[m] = _mm512_reduce_add_ps(t);
    }
}

/* Shared driver. K_I8/K_F8: fp32 row scale, no groups (G = K). K_U8: fp16 group scales. */
static void gemv8(int kind, const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t G,
                  const void *scale, const float *bias, uint16_t *y) {
    int64_t ng = (K + G - 1) / G;
    int gsh = __builtin_ctzll((unsigned long long)G);
    int64_t ldx = K + 48; /* rows 4 KiB apart would alias in L1 */
    float *xf = malloc(sizeof(float) * (size_t)(MB * ldx + MB * ng));
    float *xs = xf + MB * ldx; /* per-group sums of x for the offset corrections */
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        int mb = M - m0 < MB ? (int)(M - m0) : MB;
        for (int m = 0; m < mb; m++) {
            for (int64_t k = 0; k < K; k++) xf[m * ldx + k] = bf16_to_f32(x[(m0 + m) * K + k]);
            group_sums(xf + m * ldx, K, G, xs + m * ng);
        }
#pragma omp parallel if (N * K * mb > PAR_MIN_WORK)
        {
            float *sc = kind == K_U8 ? malloc(sizeof(float) * (size_t)(ng + 1)) : NULL;
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) {
                float r[MB];
                const uint8_t *wr = w + n * K;
                if (sc) row_scales((const uint16_t *)scale + n * ng, ng, sc);
                switch (mb) { /* constant mb lets the compiler keep the accumulators in registers */
                case 1: row_dot8(kind, 1, wr, K, xf, ldx, gsh, sc, r); break;
                case 2: row_dot8(kind, 2, wr, K, xf, ldx, gsh, sc, r); break;
                case 3: row_dot8(kind, 3, wr, K, xf, ldx, gsh, sc, r); break;
                default: row_dot8(kind, 4, wr, K, xf, ldx, gsh, sc, r); break;
                }
                for (int m = 0; m < mb; m++) {
                    float v;
                    if (kind == K_U8)
                        v = r[m] - group_corr(sc, NULL, OFF_U8 + 136.0f, 0.0f, xs + m * ng, ng);
                    else if (kind == K_I8)
                        v = (r[m] - OFF_I8 * xs[m]) * ((const float *)scale)[n];
                    else
                        v = r[m] * ((const float *)scale)[n] * 256.0f;
                    store_out(y + m0 * N, N, m, n, v, bias);
                }
            }
            free(sc);
        }
    }
    free(xf);
}

void gemv_int8(const uint16_t *x, int64_t M, int64_t K, const int8_t *w, int64_t N, const float *scale,
               const float *bias, uint16_t *y) {
    int64_t G = 1;
    while (G < K) G <<= 1; /* one "group" spanning the row */
    gemv8(K_I8, x, M, K, (const uint8_t *)w, N, G, scale, bias, y);
}

void gemv_fp8(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *scale,
              const float *bias, uint16_t *y) {
    int64_t G = 1;
    while (G < K) G <<= 1;
    gemv8(K_F8, x, M, K, w, N, G, scale, bias, y);
}

/* nested int8: x is [M, Kp] (zero-padded by the caller), w [N, Kp], scale fp16 [N, Kp / G] */
void gemv_nested(const uint16_t *x, int64_t M, int64_t Kp, const uint8_t *w, int64_t N, int64_t G,
                 const uint16_t *scale, const float *bias, uint16_t *y) {
    gemv8(K_U8, x, M, Kp, w, N, G, scale, bias, y);
}

/* ---------------------------------------------------------------- int4 GEMV */

/* One 64-element block: 32 bytes, element 2j in the low nibble of byte j. A nibble q in a 16-bit lane
 * becomes the bf16 number 128 + q by OR-ing in 0x4300 (exact), so the products run on vdpbf16ps against x
 * pre-split into even and odd elements; the caller subtracts (128 + z) * s * sum(x) per group. The 16 fp32
 * lanes of the result cover elements 0..31 (lanes 0-7) and 32..63 (lanes 8-15): one scale each half. */
static inline __attribute__((always_inline)) void block4(int mb, const uint8_t *w, __mmask32 lm, __m512 sv,
                                                         const uint16_t *xp, int64_t ldx, __m512 *tot) {
    const __m512i lomask = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
    __m512i q = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(lm, w));
    __m512i lo = _mm512_ternarylogic_epi32(q, lomask, magic, 0xEA); /* (q & 0xF) | 0x4300 */
    __m512i hi = _mm512_or_si512(_mm512_srli_epi16(q, 4), magic);
    for (int m = 0; m < mb; m++) {
        __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)lo,
                                      (__m512bh)_mm512_loadu_si512(xp + m * ldx));
        acc = _mm512_dpbf16_ps(acc, (__m512bh)hi, (__m512bh)_mm512_loadu_si512(xp + m * ldx + 32));
        tot[m] = _mm512_fmadd_ps(acc, sv, tot[m]);
    }
}

static inline __m512 block_scales(const float *sc, int64_t b, int gsh) {
    /* elements 0..31 of block b are in group (64b) >> gsh, 32..63 in (64b + 32) >> gsh */
    return _mm512_mask_mov_ps(_mm512_set1_ps(sc[(b * 64) >> gsh]), 0xFF00, _mm512_set1_ps(sc[(b * 64 + 32) >> gsh]));
}

static inline __attribute__((always_inline)) void row_dot4(int mb, const uint8_t *w, int64_t nbytes, int gsh,
                                                           const float *sc, const uint16_t *xp, int64_t ldx,
                                                           float *out) {
    __m512 t0[MB], t1[MB]; /* two chains, alternate blocks */
    for (int m = 0; m < mb; m++) t0[m] = t1[m] = _mm512_setzero_ps();
    int64_t nfull = nbytes / 32, b = 0;
    for (; b + 2 <= nfull; b += 2) {
        block4(mb, w + b * 32, 0xFFFFFFFFu, block_scales(sc, b, gsh), xp + b * 64, ldx, t0);
        block4(mb, w + b * 32 + 32, 0xFFFFFFFFu, block_scales(sc, b + 1, gsh), xp + b * 64 + 64, ldx, t1);
    }
    for (; b * 32 < nbytes; b++) /* G == 32 can leave a half block: high bytes read as 0, sc[ng] == 0 */
        block4(mb, w + b * 32, b < nfull ? 0xFFFFFFFFu : 0xFFFFu, block_scales(sc, b, gsh), xp + b * 64, ldx, t0);
    for (int m = 0; m < mb; m++) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(t0[m], t1[m]));
}

/* x [M, Kp] bf16 zero-padded; w [N, Kp / 2]; scale fp16 [N, Kp / G]; zeros uint8 [N, Kp / G] or NULL */
void gemv_int4(const uint16_t *x, int64_t M, int64_t Kp, const uint8_t *w, int64_t N, int64_t G,
               const uint16_t *scale, const uint8_t *zeros, const float *bias, uint16_t *y) {
    int64_t ng = Kp / G, nbytes = Kp / 2, kx = (Kp + 63) / 64 * 64;
    int gsh = __builtin_ctzll((unsigned long long)G);
    uint16_t *xp = calloc((size_t)(MB * kx), sizeof(uint16_t));
    float *xf = malloc(sizeof(float) * (size_t)(Kp + MB * ng));
    float *xs = xf + Kp;
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        int mb = M - m0 < MB ? (int)(M - m0) : MB;
        for (int m = 0; m < mb; m++) {
            const uint16_t *xr = x + (m0 + m) * Kp;
            for (int64_t k = 0; k < Kp; k++) { /* even elements first, then odd, within each 64-block */
                xp[m * kx + (k / 64) * 64 + (k % 64) / 2 + (k % 2) * 32] = xr[k];
                xf[k] = bf16_to_f32(xr[k]);
            }
            group_sums(xf, Kp, G, xs + m * ng);
        }
#pragma omp parallel if (N * nbytes * mb > PAR_MIN_WORK)
        {
            float *sc = malloc(sizeof(float) * (size_t)(ng + 1));
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) {
                float r[MB];
                row_scales(scale + n * ng, ng, sc);
                const uint8_t *wr = w + n * nbytes;
                switch (mb) {
                case 1: row_dot4(1, wr, nbytes, gsh, sc, xp, kx, r); break;
                case 2: row_dot4(2, wr, nbytes, gsh, sc, xp, kx, r); break;
                case 3: row_dot4(3, wr, nbytes, gsh, sc, xp, kx, r); break;
                default: row_dot4(4, wr, nbytes, gsh, sc, xp, kx, r); break;
                }
                const uint8_t *zr = zeros ? zeros + n * ng : NULL;
                for (int m = 0; m < mb; m++)
                    store_out(y + m0 * N, N, m, n, r[m] - group_corr(sc, zr, 128.0f, 8.0f, xs + m * ng, ng), bias);
            }
            free(sc);
        }
    }
    free(xp);
    free(xf);
}

/* ---------------------------------------------------------------- dequantize to bf16 (batched path) */

/* rows [n0, n1) -> out [n1 - n0, K] bf16, scales applied (fp32 per row, or fp16 per group for nested) */
static void dequant8(int kind, const uint8_t *w, int64_t K, int64_t G, const void *scale, int64_t n0,
                     int64_t n1, uint16_t *out) {
    const int gsh = __builtin_ctzll((unsigned long long)G);
    const __m512 off = _mm512_set1_ps(kind == K_I8 ? OFF_I8 : kind == K_U8 ? OFF_U8 + 136.0f : 0.0f);
#pragma omp parallel for schedule(static) if ((n1 - n0) * K > PAR_MIN_WORK)
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * K;
        uint16_t *o = out + (n - n0) * K;
        __m512 s = _mm512_set1_ps(kind == K_U8 ? 0.0f : ((const float *)scale)[n] * (kind == K_F8 ? 256.0f : 1.0f));
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 mask = tail16(K - k);
            if (kind == K_U8)
                s = _mm512_set1_ps(f16_to_f32(((const uint16_t *)scale)[n * (K >> gsh) + (k >> gsh)]));
            __m512 v = _mm512_mul_ps(_mm512_sub_ps(load16(kind, wr + k, mask), off), s);
            _mm256_mask_storeu_epi16(o + k, mask, (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

void dequant_int8(const int8_t *w, int64_t K, const float *scale, int64_t n0, int64_t n1, uint16_t *out) {
    dequant8(K_I8, (const uint8_t *)w, K, 1, scale, n0, n1, out);
}

void dequant_fp8(const uint8_t *w, int64_t K, const float *scale, int64_t n0, int64_t n1, uint16_t *out) {
    dequant8(K_F8, w, K, 1, scale, n0, n1, out);
}

void dequant_nested(const uint8_t *w, int64_t Kp, int64_t G, const uint16_t *scale, int64_t n0, int64_t n1,
                    uint16_t *out) {
    dequant8(K_U8, w, Kp, G, scale, n0, n1, out);
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
