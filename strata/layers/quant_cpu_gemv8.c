/* GEMVs of the 8-bit formats: int8 and fp8 on vdpbf16ps, nested int8 on fp32 FMAs with group scales. */
#include "quant_cpu.h"

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
                        /* one row: several chains per x row hide the FMA latency */
#define ONE_ROW(MBC) rows_dot8(kind, MBC, 1, MBC == 1 ? 4 : MBC == 4 ? 1 : 2, wr + i * K, K, xf, ldx, gsh, \
                               sc + i * lds, lds, r1)
                        SWITCH_MB(mb, ONE_ROW);
#undef ONE_ROW
                        for (int m = 0; m < mb; m++) r[i][m] = r1[0][m];
                    }
                } else {
#define BLOCK(MBC) rows_dot8(kind, MBC, RB, 1, wr, K, xf, ldx, gsh, sc, lds, r)
                    SWITCH_MB(mb, BLOCK);
#undef BLOCK
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

/* 32 weight bytes of one row at column k (masked by lm at the row's end) widened to 16-bit lanes, with the
 * same line of the next block's row (`ahead` bytes further) prefetched once per 64 bytes: see PREFETCH */
static inline __attribute__((always_inline)) __m512i load_codes32(const uint8_t *p, int64_t k, int64_t ahead,
                                                                  __mmask32 lm) {
    if ((k & 63) == 0)
        _mm_prefetch((const char *)(p + ahead), _MM_HINT_T0);
    return _mm512_cvtepu8_epi16(lm == 0xFFFFFFFFu ? _mm256_loadu_si256((const __m256i *)p)
                                                   : _mm256_maskz_loadu_epi8(lm, p));
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
            __m512i q = load_codes32(w + r * K + k, k, R * K, lm);
            lo[r] = _mm512_ternarylogic_epi32(q, lomask, magic, 0xEA);                       /* (q & 15) | C */
            hi[r] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(q, 4), eight, magic, 0xBE);  /* (q>>4 ^ 8) | C */
        }
        for (int m = 0; m < mb; m++) {
            __m512bh xv = AS_BH(_mm512_loadu_si512(xh + (2 * m) * ldx + k));
            __m512bh x16 = AS_BH(_mm512_loadu_si512(xh + (2 * m + 1) * ldx + k));
            for (int r = 0; r < R; r++) {
                acc[r][m][0] = _mm512_dpbf16_ps(acc[r][m][0], AS_BH(hi[r]), x16);
                acc[r][m][split - 1] = _mm512_dpbf16_ps(acc[r][m][split - 1], AS_BH(lo[r]), xv);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++)
            out[r][m] = _mm512_reduce_add_ps(split == 2 ? _mm512_add_ps(acc[r][m][0], acc[r][m][1]) : acc[r][m][0]);
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
            __m512i q = load_codes32(w + r * K + k, k, R * K, lm);
            __m512i lo = _mm512_permutex2var_epi16(tab[0], q, tab[1]); /* magnitudes 0..63 (index bits 0-5) */
            __m512i hi = _mm512_permutex2var_epi16(tab[2], q, tab[3]); /* magnitudes 64..127 */
            __m512i t = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(q, bit6), lo, hi);
            v[r] = _mm512_ternarylogic_epi32(_mm512_slli_epi16(q, 8), signbit, t, 0xEA); /* sign | t */
        }
        for (int m = 0; m < mb; m++) {
            __m512bh xv = AS_BH(_mm512_loadu_si512(xh + m * ldx + k));
            for (int r = 0; r < R; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], AS_BH(v[r]), xv);
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) out[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}

/* One row block of either kind; `tab` is the fp8 table (unused for int8). */
static inline __attribute__((always_inline)) void rows_dot_bf16(int is_fp8, int mb, int R, const uint8_t *w,
                                                                int64_t K, const uint16_t *xh, int64_t ldx,
                                                                const __m512i *tab, float out[][MB]) {
    if (is_fp8)
        rows_dot_f8(mb, R, w, K, xh, ldx, tab, out);
    else
        rows_dot_i8(mb, R, w, K, xh, ldx, out);
}

/* Driver of the int8 and fp8 GEMVs (specialised per kind). x rows are copied into zero-padded bf16 rows:
 * for int8 each x row is followed by 16 x, and its sum feeds the 2304 * sum(x) correction. */
static inline __attribute__((always_inline)) void gemv_bf16dot(int is_fp8, const uint16_t *x, int64_t M, int64_t K,
                                                               const uint8_t *w, int64_t N, const float *scale,
                                                               const float *bias, uint16_t *y) {
    __m512i tab[4];
    if (is_fp8) {
        uint16_t table[128];
        for (int mag = 0; mag < 128; mag++) { /* e4m3: exponent bias 7, subnormals m * 2^-9 */
            int e = mag >> 3, mt = mag & 7;
            table[mag] = f32_to_bf16(e ? ldexpf(1.0f + mt / 8.0f, e - 7) : ldexpf((float)mt, -9)); /* exact */
        }
        for (int i = 0; i < 4; i++) tab[i] = _mm512_loadu_si512(table + 32 * i);
    }
    const int per_row = is_fp8 ? 1 : 2;                      /* x, or x and 16 x */
    int64_t ldx = (K + 31) / 32 * 32 + 32; /* zero padded to whole chunks; +32 keeps rows off 4 KiB aliasing */
    uint16_t *xh = calloc((size_t)(per_row * MB * ldx), sizeof(uint16_t));
    float xs[MB];
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        int mb = M - m0 < MB ? (int)(M - m0) : MB;
        for (int m = 0; m < mb; m++) {
            float sum = 0;
            for (int64_t k = 0; k < K; k++) {
                uint16_t v = x[(m0 + m) * K + k];
                xh[per_row * m * ldx + k] = v;
                if (!is_fp8) {
                    xh[(2 * m + 1) * ldx + k] = f32_to_bf16(bf16_to_f32(v) * 16.0f); /* exact */
                    sum += bf16_to_f32(v);
                }
            }
            xs[m] = is_fp8 ? 0.0f : 2304.0f * sum;
        }
        int64_t nblocks = (N + RB - 1) / RB;
#pragma omp parallel for schedule(static) if (N * K * mb > PAR_MIN_WORK)
        for (int64_t blk = 0; blk < nblocks; blk++) {
            int64_t n0 = blk * RB;
            int rows = N - n0 < RB ? (int)(N - n0) : RB;
            float r[RB][MB];
            const uint8_t *wr = w + n0 * K;
            if (rows < RB) { /* the last rows, one at a time */
                for (int i = 0; i < rows; i++) {
                    float r1[1][MB];
#define ONE_ROW(MBC) rows_dot_bf16(is_fp8, MBC, 1, wr + i * K, K, xh, ldx, tab, r1)
                    SWITCH_MB(mb, ONE_ROW);
#undef ONE_ROW
                    for (int m = 0; m < mb; m++) r[i][m] = r1[0][m];
                }
            } else {
#define BLOCK(MBC) rows_dot_bf16(is_fp8, MBC, RB, wr, K, xh, ldx, tab, r)
                SWITCH_MB(mb, BLOCK);
#undef BLOCK
            }
            for (int i = 0; i < rows; i++)
                for (int m = 0; m < mb; m++)
                    store_out(y + m0 * N, N, m, n0 + i, (r[i][m] - xs[m]) * scale[n0 + i], bias);
        }
    }
    free(xh);
}

void gemv_int8(const uint16_t *x, int64_t M, int64_t K, const int8_t *w, int64_t N, const float *scale,
               const float *bias, uint16_t *y) {
#ifndef __AVX512F__
    if (K % 32 == 0) { /* the AVX2 build's own kernel (quant_cpu_q32x16_avx2.c) */
        int8_gemv_x16_avx2(x, M, K, w, N, scale, bias, y);
        return;
    }
#endif
    gemv_bf16dot(0, x, M, K, (const uint8_t *)w, N, scale, bias, y);
}

void gemv_fp8(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *scale,
              const float *bias, uint16_t *y) {
#ifndef __AVX512F__
    if (K % 16 == 0) { /* the AVX2 build's own kernel (quant_cpu_gemv16_avx2.c) */
        fp8_gemv_avx2(x, M, K, w, N, scale, bias, y);
        return;
    }
#endif
    gemv_bf16dot(1, x, M, K, w, N, scale, bias, y);
}
