/* GEMV of the int4 formats (symmetric and asymmetric, any power-of-two group of 32 or more). */
#include "quant_cpu.h"

/* One 64-element block: 32 bytes, element 2j in the low nibble of byte j. A nibble q in a 16-bit lane
 * becomes the bf16 number 128 + q by OR-ing in 0x4300 (exact), so the products run on vdpbf16ps against x
 * pre-split into even and odd elements; the caller subtracts (128 + z) * s * sum(x) per group. The 16 fp32
 * lanes of the result cover elements 0..31 (lanes 0-7) and 32..63 (lanes 8-15): one scale each half. */
static inline __attribute__((always_inline)) __m512 block_scales(const float *sc, int64_t b, int gsh) {
    /* elements 0..31 of block b are in group (64b) >> gsh, 32..63 in (64b + 32) >> gsh: one group unless G = 32 */
    if (gsh >= 6)
        return _mm512_set1_ps(sc[(b * 64) >> gsh]);
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
        __m512bh xe = AS_BH(_mm512_loadu_si512(xp + m * ldx + b * 64));
        __m512bh xo = AS_BH(_mm512_loadu_si512(xp + m * ldx + b * 64 + 32));
        for (int r = 0; r < R; r++) {
            __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), AS_BH(lo[r]), xe);
            acc = _mm512_dpbf16_ps(acc, AS_BH(hi[r]), xo);
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
#ifndef __AVX512F__
    if (G % 32 == 0) { /* the AVX2 build's own kernel (quant_cpu_q32x16_avx2.c) */
        int4_gemv_x16_avx2(x, M, Kp, w, N, G, scale, zeros, bias, y);
        return;
    }
#endif
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
#define ONE_ROW(MBC) rows_dot4(MBC, 1, wr + i * nbytes, nbytes, gsh, sc + i * lds, lds, xp, kx, r1)
                        SWITCH_MB(mb, ONE_ROW);
#undef ONE_ROW
                        for (int m = 0; m < mb; m++) r[i][m] = r1[0][m];
                    }
                } else {
#define BLOCK(MBC) rows_dot4(MBC, MBC == 1 ? RB4 : 2, wr, nbytes, gsh, sc, lds, xp, kx, r)
                    SWITCH_MB(mb, BLOCK);
#undef BLOCK
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

