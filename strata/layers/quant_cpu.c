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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MB 4 /* activation rows handled per pass over the weights */
#define PAR_MIN_WORK (1 << 18) /* below this many weight bytes, threading costs more than it saves */
/* PREFETCH: the GEMVs walk R weight rows side by side, a few KiB each, so the hardware prefetcher has to
 * find R new streams at every block. Each load therefore prefetches the same cache line of the next block's
 * row (R rows further): measured 1.5x faster DRAM-bound on one Zen 5 core than no or short-distance prefetch.
 * Prefetches past the end of the matrix are harmless (they never fault). */

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
static inline __attribute__((always_inline)) void rows_dot8(int kind, int mb, int R, int U, const uint8_t *w,
                                                            int64_t K, const float *xf, int64_t ldx, int gsh,
                                                            const float *sc, int64_t lds, float out[][MB]) {
    __m512 acc[4][MB][4];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++)
            for (int u = 0; u < U; u++) acc[r][m][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 * U <= K; k += 16 * U) {
        for (int u = 0; u < U; u++) {
            __m512 wv[4];
            for (int r = 0; r < R; r++) {
                if (((k + 16 * u) & 63) == 0) /* the same line of the next block's row: see PREFETCH */
                    _mm_prefetch((const char *)(w + (r + R) * K + k + 16 * u), _MM_HINT_T0);
                wv[r] = load16(kind, w + r * K + k + 16 * u, 0xFFFF);
                if (sc) wv[r] = _mm512_mul_ps(wv[r], _mm512_set1_ps(sc[r * lds + ((k + 16 * u) >> gsh)]));
            }
            for (int m = 0; m < mb; m++) {
                __m512 xv = _mm512_loadu_ps(xf + m * ldx + k + 16 * u);
                for (int r = 0; r < R; r++) acc[r][m][u] = _mm512_fmadd_ps(wv[r], xv, acc[r][m][u]);
            }
        }
    }
    for (; k < K; k += 16) {
        __mmask16 mask = tail16(K - k);
        for (int r = 0; r < R; r++) {
            __m512 wv = load16(kind, w + r * K + k, mask);
            if (sc) wv = _mm512_mul_ps(wv, _mm512_set1_ps(sc[r * lds + (k >> gsh)]));
            for (int m = 0; m < mb; m++)
                acc[r][m][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, xf + m * ldx + k), acc[r][m][0]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) {
            __m512 t = acc[r][m][0];
            for (int u = 1; u < U; u++) t = _mm512_add_ps(t, acc[r][m][u]);
            out[r][m] = _mm512_reduce_add_ps(t);
        }
}

#define RB 4 /* weight rows per block when several x rows share the pass */

/* nested int8: x is [M, Kp] (zero-padded by the caller), w [N, Kp], scale fp16 [N, Kp / G] */
void gemv_nested(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t G,
                 const uint16_t *scale, const float *bias, uint16_t *y) {
    const int kind = K_U8;
    int64_t ng = (K + G - 1) / G, lds = ng + 1;
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
        int64_t nblocks = (N + RB - 1) / RB;
#pragma omp parallel if (N * K * mb > PAR_MIN_WORK)
        {
            float *sc = malloc(sizeof(float) * (size_t)(RB * lds));
#pragma omp for schedule(static)
            for (int64_t blk = 0; blk < nblocks; blk++) {
                int64_t n0 = blk * RB;
                int rows = N - n0 < RB ? (int)(N - n0) : RB;
                float r[RB][MB];
                const uint8_t *wr = w + n0 * K;
                for (int i = 0; i < rows; i++) row_scales(scale + (n0 + i) * ng, ng, sc + i * lds);
                if (rows < RB) { /* the last rows, one at a time */
                    for (int i = 0; i < rows; i++) {
                        float r1[1][MB];
                        switch (mb) {
                        case 1: rows_dot8(kind, 1, 1, 4, wr + i * K, K, xf, ldx, gsh, sc + i * lds, lds, r1); break;
                        case 2: rows_dot8(kind, 2, 1, 2, wr + i * K, K, xf, ldx, gsh, sc + i * lds, lds, r1); break;
                        case 3: rows_dot8(kind, 3, 1, 2, wr + i * K, K, xf, ldx, gsh, sc + i * lds, lds, r1); break;
                        default: rows_dot8(kind, 4, 1, 1, wr + i * K, K, xf, ldx, gsh, sc + i * lds, lds, r1); break;
                        }
                        for (int m = 0; m < mb; m++) r[i][m] = r1[0][m];
                    }
                } else {
                    switch (mb) { /* constant shapes keep the accumulators in registers */
                    case 1: rows_dot8(kind, 1, RB, 1, wr, K, xf, ldx, gsh, sc, lds, r); break;
                    case 2: rows_dot8(kind, 2, RB, 1, wr, K, xf, ldx, gsh, sc, lds, r); break;
                    case 3: rows_dot8(kind, 3, RB, 1, wr, K, xf, ldx, gsh, sc, lds, r); break;
                    default: rows_dot8(kind, 4, RB, 1, wr, K, xf, ldx, gsh, sc, lds, r); break;
                    }
                }
                for (int i = 0; i < rows; i++) {
                    int64_t n = n0 + i;
                    for (int m = 0; m < mb; m++)
                        store_out(y + m0 * N, N, m, n,
                                  r[i][m] - group_corr(sc + i * lds, NULL, OFF_U8 + 136.0f, 0.0f, xs + m * ng, ng), bias);
                }
            }
            free(sc);
        }
    }
    free(xf);
}

/* int8 GEMV on vdpbf16ps. A signed byte v read as unsigned is u = v + 128 = 16 hi + lo (two nibbles), and
 * each nibble ORed into 0x4300 is the exact bf16 number 128 + nibble. With x16 = 16 x (exact in bf16):
 *   sum(x16 * (128 + hi)) + sum(x * (128 + lo)) = sum(x * v) + 2304 * sum(x),
 * so 32 weights cost one widening load, three logic ops and two vdpbf16ps (fewer than through fp32). */
static inline __attribute__((always_inline)) void rows_dot_i8(int mb, int R, const uint8_t *w, int64_t K,
                                                              const uint16_t *xh, int64_t ldx, float out[][MB]) {
    enum { S = 2 };
    const int split = mb == 1 ? 2 : 1; /* a second chain per row when one x row leaves few chains */
    const __m512i lomask = _mm512_set1_epi16(0x000F), eight = _mm512_set1_epi16(0x0008),
                  magic = _mm512_set1_epi16(0x4300);
    __m512 acc[4][MB][S];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) acc[r][m][0] = acc[r][m][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __mmask32 lm = K - k >= 32 ? 0xFFFFFFFFu : (__mmask32)((1ull << (K - k)) - 1);
        __m512i lo[4], hi[4];
        for (int r = 0; r < R; r++) {
            const uint8_t *p = w + r * K + k;
            if ((k & 63) == 0) /* the same line of the next block's row: see PREFETCH */
                _mm_prefetch((const char *)(p + R * K), _MM_HINT_T0);
            __m512i q = _mm512_cvtepu8_epi16(lm == 0xFFFFFFFFu ? _mm256_loadu_si256((const __m256i *)p)
                                                                 : _mm256_maskz_loadu_epi8(lm, p));
            lo[r] = _mm512_ternarylogic_epi32(q, lomask, magic, 0xEA);                       /* (q & 15) | C */
            hi[r] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(q, 4), eight, magic, 0xBE);  /* (q>>4 ^ 8) | C */
        }
        for (int m = 0; m < mb; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(xh + (2 * m) * ldx + k);
            __m512bh x16 = (__m512bh)_mm512_loadu_si512(xh + (2 * m + 1) * ldx + k);
            for (int r = 0; r < R; r++) {
                acc[r][m][0] = _mm512_dpbf16_ps(acc[r][m][0], (__m512bh)hi[r], x16);
                acc[r][m][split - 1] = _mm512_dpbf16_ps(acc[r][m][split - 1], (__m512bh)lo[r], xv);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++)
            out[r][m] = _mm512_reduce_add_ps(split == 2 ? _mm512_add_ps(acc[r][m][0], acc[r][m][1]) : acc[r][m][0]);
}

void gemv_int8(const uint16_t *x, int64_t M, int64_t K, const int8_t *w8, int64_t N, const float *scale,
               const float *bias, uint16_t *y) {
    const uint8_t *w = (const uint8_t *)w8;
    int64_t ldx = (K + 31) / 32 * 32 + 32; /* zero padded to whole chunks; +32 keeps rows off 4 KiB aliasing */
    uint16_t *xh = calloc((size_t)(2 * MB * ldx), sizeof(uint16_t)); /* per x row: x, then 16 x */
    float xs[MB];
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        int mb = M - m0 < MB ? (int)(M - m0) : MB;
        for (int m = 0; m < mb; m++) {
            float sum = 0;
            for (int64_t k = 0; k < K; k++) {
                uint16_t v = x[(m0 + m) * K + k];
                xh[2 * m * ldx + k] = v;
                xh[(2 * m + 1) * ldx + k] = f32_to_bf16(bf16_to_f32(v) * 16.0f); /* exact */
                sum += bf16_to_f32(v);
            }
            xs[m] = sum;
        }
        int64_t nblocks = (N + RB - 1) / RB;
#pragma omp parallel for schedule(static) if (N * K * mb > PAR_MIN_WORK)
        for (int64_t blk = 0; blk < nblocks; blk++) {
            int64_t n0 = blk * RB;
            int rows = N - n0 < RB ? (int)(N - n0) : RB;
            float r[RB][MB];
            const uint8_t *wr = w + n0 * K;
            if (rows < RB) {
                for (int i = 0; i < rows; i++) {
                    float r1[1][MB];
                    switch (mb) {
                    case 1: rows_dot_i8(1, 1, wr + i * K, K, xh, ldx, r1); break;
                    case 2: rows_dot_i8(2, 1, wr + i * K, K, xh, ldx, r1); break;
                    case 3: rows_dot_i8(3, 1, wr + i * K, K, xh, ldx, r1); break;
                    default: rows_dot_i8(4, 1, wr + i * K, K, xh, ldx, r1); break;
                    }
                    for (int m = 0; m < mb; m++) r[i][m] = r1[0][m];
                }
            } else {
                switch (mb) {
                case 1: rows_dot_i8(1, RB, wr, K, xh, ldx, r); break;
                case 2: rows_dot_i8(2, RB, wr, K, xh, ldx, r); break;
                case 3: rows_dot_i8(3, RB, wr, K, xh, ldx, r); break;
                default: rows_dot_i8(4, RB, wr, K, xh, ldx, r); break;
                }
            }
            for (int i = 0; i < rows; i++)
                for (int m = 0; m < mb; m++)
                    store_out(y + m0 * N, N, m, n0 + i, (r[i][m] - 2304.0f * xs[m]) * scale[n0 + i], bias);
        }
    }
    free(xh);
}

/* fp8 e4m3 GEMV on vdpbf16ps: every e4m3 value is exact in bf16, so a 128-entry table (four registers,
 * two vpermt2w lookups of 64 entries selected by bit 6) turns 32 codes into bf16, and the sign is ORed in. */
static inline __attribute__((always_inline)) void rows_dot_f8(int mb, int R, const uint8_t *w, int64_t K,
                                                              const uint16_t *xh, int64_t ldx, const __m512i *tab,
                                                              float out[][MB]) {
    __m512 acc[4][MB];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) acc[r][m] = _mm512_setzero_ps();
    const __m512i bit6 = _mm512_set1_epi16(0x40), signbit = _mm512_set1_epi16((short)0x8000);
    for (int64_t k = 0; k < K; k += 32) {
        __mmask32 lm = K - k >= 32 ? 0xFFFFFFFFu : (__mmask32)((1ull << (K - k)) - 1);
        __m512i v[4];
        for (int r = 0; r < R; r++) {
            const uint8_t *p = w + r * K + k;
            if ((k & 63) == 0) /* the same line of the next block's row: see PREFETCH */
                _mm_prefetch((const char *)(p + R * K), _MM_HINT_T0);
            __m512i q = _mm512_cvtepu8_epi16(lm == 0xFFFFFFFFu ? _mm256_loadu_si256((const __m256i *)p)
                                                                 : _mm256_maskz_loadu_epi8(lm, p));
            __m512i lo = _mm512_permutex2var_epi16(tab[0], q, tab[1]); /* magnitudes 0..63 (index bits 0-5) */
            __m512i hi = _mm512_permutex2var_epi16(tab[2], q, tab[3]); /* magnitudes 64..127 */
            __m512i t = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(q, bit6), lo, hi);
            v[r] = _mm512_ternarylogic_epi32(_mm512_slli_epi16(q, 8), signbit, t, 0xEA); /* sign | t */
        }
        for (int m = 0; m < mb; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(xh + m * ldx + k);
            for (int r = 0; r < R; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)v[r], xv);
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) out[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}

void gemv_fp8(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *scale,
              const float *bias, uint16_t *y) {
    uint16_t table[128];
    for (int mag = 0; mag < 128; mag++) { /* e4m3: exponent bias 7, subnormals m * 2^-9 */
        int e = mag >> 3, mt = mag & 7;
        float v = e ? ldexpf(1.0f + mt / 8.0f, e - 7) : ldexpf((float)mt, -9);
        table[mag] = f32_to_bf16(v); /* exact: 3 mantissa bits */
    }
    __m512i tab[4];
    for (int i = 0; i < 4; i++) tab[i] = _mm512_loadu_si512(table + 32 * i);
    int64_t ldx = (K + 31) / 32 * 32 + 32; /* zero padded to whole chunks; +32 keeps rows off 4 KiB aliasing */
    uint16_t *xh = calloc((size_t)(MB * ldx), sizeof(uint16_t));
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        int mb = M - m0 < MB ? (int)(M - m0) : MB;
        for (int m = 0; m < mb; m++) memcpy(xh + m * ldx, x + (m0 + m) * K, sizeof(uint16_t) * (size_t)K);
        int64_t nblocks = (N + RB - 1) / RB;
#pragma omp parallel for schedule(static) if (N * K * mb > PAR_MIN_WORK)
        for (int64_t blk = 0; blk < nblocks; blk++) {
            int64_t n0 = blk * RB;
            int rows = N - n0 < RB ? (int)(N - n0) : RB;
            float r[RB][MB];
            const uint8_t *wr = w + n0 * K;
            if (rows < RB) {
                for (int i = 0; i < rows; i++) {
                    float r1[1][MB];
                    switch (mb) {
                    case 1: rows_dot_f8(1, 1, wr + i * K, K, xh, ldx, tab, r1); break;
                    case 2: rows_dot_f8(2, 1, wr + i * K, K, xh, ldx, tab, r1); break;
                    case 3: rows_dot_f8(3, 1, wr + i * K, K, xh, ldx, tab, r1); break;
                    default: rows_dot_f8(4, 1, wr + i * K, K, xh, ldx, tab, r1); break;
                    }
                    for (int m = 0; m < mb; m++) r[i][m] = r1[0][m];
                }
            } else {
                switch (mb) {
                case 1: rows_dot_f8(1, RB, wr, K, xh, ldx, tab, r); break;
                case 2: rows_dot_f8(2, RB, wr, K, xh, ldx, tab, r); break;
                case 3: rows_dot_f8(3, RB, wr, K, xh, ldx, tab, r); break;
                default: rows_dot_f8(4, RB, wr, K, xh, ldx, tab, r); break;
                }
            }
            for (int i = 0; i < rows; i++)
                for (int m = 0; m < mb; m++) store_out(y + m0 * N, N, m, n0 + i, r[i][m] * scale[n0 + i], bias);
        }
    }
    free(xh);
}


/* ---------------------------------------------------------------- int4 GEMV */

/* One 64-element block: 32 bytes, element 2j in the low nibble of byte j. A nibble q in a 16-bit lane
 * becomes the bf16 number 128 + q by OR-ing in 0x4300 (exact), so the products run on vdpbf16ps against x
 * pre-split into even and odd elements; the caller subtracts (128 + z) * s * sum(x) per group. The 16 fp32
 * lanes of the result cover elements 0..31 (lanes 0-7) and 32..63 (lanes 8-15): one scale each half. */
static inline __attribute__((always_inline)) __m512 block_scales(const float *sc, int64_t b, int gsh) {
    /* elements 0..31 of block b are in group (64b) >> gsh, 32..63 in (64b + 32) >> gsh */
    return _mm512_mask_mov_ps(_mm512_set1_ps(sc[(b * 64) >> gsh]), 0xFF00, _mm512_set1_ps(sc[(b * 64 + 32) >> gsh]));
}

/* Block b of R consecutive weight rows against mb x rows: tot[r][m] += scale * dot. */
static inline __attribute__((always_inline)) void block4(int mb, int R, const uint8_t *w, int64_t ldw, int64_t b,
                                                         __mmask32 lm, const float *sc, int64_t lds, int gsh,
                                                         const uint16_t *xp, int64_t ldx, __m512 tot[][MB]) {
    const __m512i lomask = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
    __m512i lo[4], hi[4];
    __m512 sv[4];
    for (int r = 0; r < R; r++) {
        const uint8_t *p = w + r * ldw + b * 32;
        if ((b & 1) == 0) /* the same line of the next block's row: see PREFETCH */
            _mm_prefetch((const char *)(p + R * ldw), _MM_HINT_T0);
        __m512i q = _mm512_cvtepu8_epi16(lm == 0xFFFFFFFFu ? _mm256_loadu_si256((const __m256i *)p)
                                                             : _mm256_maskz_loadu_epi8(lm, p));
        lo[r] = _mm512_ternarylogic_epi32(q, lomask, magic, 0xEA); /* (q & 0xF) | 0x4300 */
        hi[r] = _mm512_or_si512(_mm512_srli_epi16(q, 4), magic);
        sv[r] = block_scales(sc + r * lds, b, gsh);
    }
    for (int m = 0; m < mb; m++) {
        __m512bh xe = (__m512bh)_mm512_loadu_si512(xp + m * ldx + b * 64);
        __m512bh xo = (__m512bh)_mm512_loadu_si512(xp + m * ldx + b * 64 + 32);
        for (int r = 0; r < R; r++) {
            __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)lo[r], xe);
            acc = _mm512_dpbf16_ps(acc, (__m512bh)hi[r], xo);
            tot[r][m] = _mm512_fmadd_ps(acc, sv[r], tot[r][m]);
        }
    }
}

/* out[r][m] for R weight rows of nbytes each; two chains (even/odd blocks) per (row, x row) */
static inline __attribute__((always_inline)) void rows_dot4(int mb, int R, const uint8_t *w, int64_t nbytes,
                                                            int gsh, const float *sc, int64_t lds,
                                                            const uint16_t *xp, int64_t ldx, float out[][MB]) {
    __m512 t0[4][MB], t1[4][MB];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) t0[r][m] = t1[r][m] = _mm512_setzero_ps();
    int64_t nfull = nbytes / 32, b = 0;
    for (; b + 2 <= nfull; b += 2) {
        block4(mb, R, w, nbytes, b, 0xFFFFFFFFu, sc, lds, gsh, xp, ldx, t0);
        block4(mb, R, w, nbytes, b + 1, 0xFFFFFFFFu, sc, lds, gsh, xp, ldx, t1);
    }
    for (; b * 32 < nbytes; b++) /* G == 32 can leave a half block: high bytes read as 0, sc[ng] == 0 */
        block4(mb, R, w, nbytes, b, b < nfull ? 0xFFFFFFFFu : 0xFFFFu, sc, lds, gsh, xp, ldx, t0);
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) out[r][m] = _mm512_reduce_add_ps(_mm512_add_ps(t0[r][m], t1[r][m]));
}

#define RB4 4 /* weight rows per block in the int4 GEMV (2 when several x rows share the pass) */

/* x [M, Kp] bf16 zero-padded; w [N, Kp / 2]; scale fp16 [N, Kp / G]; zeros uint8 [N, Kp / G] or NULL */
void gemv_int4(const uint16_t *x, int64_t M, int64_t Kp, const uint8_t *w, int64_t N, int64_t G,
               const uint16_t *scale, const uint8_t *zeros, const float *bias, uint16_t *y) {
    int64_t ng = Kp / G, lds = ng + 1, nbytes = Kp / 2, kx = (Kp + 63) / 64 * 64 + 32; /* +32: no 4K aliasing */
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
        const int R = mb == 1 ? RB4 : 2; /* measured best on Zen 5: 4 rows for M = 1, 2 otherwise */
        int64_t nblocks = (N + R - 1) / R;
#pragma omp parallel if (N * nbytes * mb > PAR_MIN_WORK)
        {
            float *sc = malloc(sizeof(float) * (size_t)(RB4 * lds));
#pragma omp for schedule(static)
            for (int64_t blk = 0; blk < nblocks; blk++) {
                int64_t n0 = blk * R;
                int rows = N - n0 < R ? (int)(N - n0) : R;
                float r[RB4][MB];
                for (int i = 0; i < rows; i++) {
                    row_scales(scale + (n0 + i) * ng, ng, sc + i * lds); /* also sets sc[ng] = 0 */
                }
                const uint8_t *wr = w + n0 * nbytes;
                if (rows < R) {
                    for (int i = 0; i < rows; i++) {
                        float r1[1][MB];
                        switch (mb) {
                        case 1: rows_dot4(1, 1, wr + i * nbytes, nbytes, gsh, sc + i * lds, lds, xp, kx, r1); break;
                        case 2: rows_dot4(2, 1, wr + i * nbytes, nbytes, gsh, sc + i * lds, lds, xp, kx, r1); break;
                        case 3: rows_dot4(3, 1, wr + i * nbytes, nbytes, gsh, sc + i * lds, lds, xp, kx, r1); break;
                        default: rows_dot4(4, 1, wr + i * nbytes, nbytes, gsh, sc + i * lds, lds, xp, kx, r1); break;
                        }
                        for (int m = 0; m < mb; m++) r[i][m] = r1[0][m];
                    }
                } else {
                    switch (mb) {
                    case 1: rows_dot4(1, RB4, wr, nbytes, gsh, sc, lds, xp, kx, r); break;
                    case 2: rows_dot4(2, 2, wr, nbytes, gsh, sc, lds, xp, kx, r); break;
                    case 3: rows_dot4(3, 2, wr, nbytes, gsh, sc, lds, xp, kx, r); break;
                    default: rows_dot4(4, 2, wr, nbytes, gsh, sc, lds, xp, kx, r); break;
                    }
                }
                for (int i = 0; i < rows; i++) {
                    int64_t n = n0 + i;
                    const uint8_t *zr = zeros ? zeros + n * ng : NULL;
                    for (int m = 0; m < mb; m++)
                        store_out(y + m0 * N, N, m, n,
                                  r[i][m] - group_corr(sc + i * lds, zr, 128.0f, 8.0f, xs + m * ng, ng), bias);
                }
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
            __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
            if (mask == 0xFFFF) /* masked stores are slow on some CPUs (AMD Zen 4/5): tail only */
                _mm256_storeu_si256((__m256i *)(o + k), h);
            else
                _mm256_mask_storeu_epi16(o + k, mask, h);
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
