/* GEMV of plain bf16 weights on vdpbf16ps, with fp32 outputs and bias: the native decoder's router, and what
 * the bf16 decode paths ran before the GEMM of quant_cpu_gemm.c, which streams a weight from memory faster
 * (linear.py, gemv_once in cpu_moe.c).
 *
 * torch's bf16 F.linear at one row streams the weights at about half the machine's read bandwidth; this loop
 * does nothing but load 64-byte lines of W, one vdpbf16ps per line and x row, and prefetch (see PREFETCH in
 * quant_cpu.h), so it runs at the speed of the weight stream. Products of two bf16 are exact in fp32; the
 * sums round like any fp32 accumulation, in a different order than oneDNN's.
 *
 * Unlike the quantized GEMVs (MB = 4 rows per pass), this one reads each weight line once for up to MB16 = 8
 * activation rows: a speculative verification of k <= 7 drafts then costs one pass over the weights, like a
 * one-row decode step. A block of RB weight rows runs its x rows four at a time (a second pass over the block's
 * rows finds them in L1), so the accumulators (4 weight rows x 4 x rows) fit the vector registers, and the RB x mb
 * sums of a block leave through one transpose tree, also at one x row.
 */
#include "quant_cpu.h"

/* SWITCH_MB extended to 8 rows: every row count compiles with its accumulators in registers */
#define SWITCH_MB8(mb, CALL)                                                                                    \
    switch (mb) {                                                                                               \
    case 1: CALL(1); break;                                                                                     \
    case 2: CALL(2); break;                                                                                     \
    case 3: CALL(3); break;                                                                                     \
    case 4: CALL(4); break;                                                                                     \
    case 5: CALL(5); break;                                                                                     \
    case 6: CALL(6); break;                                                                                     \
    case 7: CALL(7); break;                                                                                     \
    default: CALL(8); break;                                                                                    \
    }

/* acc[r][m][u]: U partial sums (16 lanes each) of sum_k x[m, k] * w[r, k] for R consecutive weight rows; x rows are
 * zero-padded to whole chunks of 32, so only the weight load of the last chunk is masked. U chains per (row, x row)
 * hide the vdpbf16ps latency when R * mb is small. */
static inline __attribute__((always_inline)) void rows_acc16(int mb, int R, int U, const uint16_t *w, int64_t K,
                                                             const uint16_t *xh, int64_t ldx,
                                                             __m512 acc[RB][MB16][2]) {
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++)
            for (int u = 0; u < U; u++) acc[r][m][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 * U <= K; k += 32 * U) {
        for (int u = 0; u < U; u++) {
            __m512i wv[RB];
            for (int r = 0; r < R; r++) {
                const uint16_t *p = w + r * K + k + 32 * u;
                /* the next block's R rows are contiguous: its lines in address order, R per step */
                _mm_prefetch((const char *)(w + R * K + ((k / 32 + u) * R + r) * 32), _MM_HINT_T0);
                wv[r] = _mm512_loadu_si512(p);
            }
            for (int m = 0; m < mb; m++) {
                __m512bh xv = AS_BH(_mm512_loadu_si512(xh + m * ldx + k + 32 * u));
                for (int r = 0; r < R; r++) acc[r][m][u] = _mm512_dpbf16_ps(acc[r][m][u], AS_BH(wv[r]), xv);
            }
        }
    }
    for (; k < K; k += 32) {
        __mmask32 lm = K - k >= 32 ? 0xFFFFFFFFu : (__mmask32)((1ull << (K - k)) - 1);
        for (int r = 0; r < R; r++) {
            __m512i wv = _mm512_maskz_loadu_epi16(lm, w + r * K + k);
            for (int m = 0; m < mb; m++)
                acc[r][m][0] = _mm512_dpbf16_ps(acc[r][m][0], AS_BH(wv), AS_BH(_mm512_loadu_si512(xh + m * ldx + k)));
        }
    }
}

/* out[r][m] = sum_k x[m, k] * w[r, k] for R consecutive weight rows (rows_acc16, each sum reduced on its own) */
static inline __attribute__((always_inline)) void rows_dot16(int mb, int R, int U, const uint16_t *w, int64_t K,
                                                             const uint16_t *xh, int64_t ldx, float out[][MB16]) {
    __m512 acc[RB][MB16][2];
    rows_acc16(mb, R, U, w, K, xh, ldx, acc);
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) {
            __m512 t = acc[r][m][0];
            for (int u = 1; u < U; u++) t = _mm512_add_ps(t, acc[r][m][u]);
            out[r][m] = _mm512_reduce_add_ps(t);
        }
}

/* The R * mb <= 16 sums of rows_dot16 as one vector, lane m * R + r: one transpose tree reduces them all (the same
 * sums as _mm512_reduce_add_ps, for a third of its instructions), and each x row's R outputs are neighbours, stored
 * together. U chains per sum, added in the order rows_dot16 adds them, so the sums are rows_dot16's bit for bit. */
static inline __attribute__((always_inline)) __m512 rows_dot16_packed(int mb, int R, int U, const uint16_t *w,
                                                                      int64_t K, const uint16_t *xh, int64_t ldx) {
    __m512 acc[RB][MB16][2], v[16];
    rows_acc16(mb, R, U, w, K, xh, ldx, acc);
    for (int i = 0; i < 16; i++) {
        v[i] = _mm512_setzero_ps();
        if (i >= R * mb) continue;
        v[i] = acc[i % R][i / R][0];
        for (int u = 1; u < U; u++) v[i] = _mm512_add_ps(v[i], acc[i % R][i / R][u]);
    }
    return sum16(v);
}

/* y[m0 + m, n0 + r] = s[m * R + r] (+ bias[n0 + r]) for m < mb, r < R: fp32, or rounded to bf16 (nearest even;
 * vcvtneps2bf16 flushes denormals to zero, where store_out keeps them) */
static inline __attribute__((always_inline)) void store_packed(__m512 s, int mb, int R, int64_t m0, int64_t n0,
                                                               int64_t N, const float *bias, void *y,
                                                               int64_t out_f32) {
    if (bias) {
        float b[16];
        for (int i = 0; i < 16; i++) b[i] = bias[n0 + i % R];
        s = _mm512_add_ps(s, _mm512_loadu_ps(b));
    }
    if (out_f32) {
        float t[16];
        _mm512_storeu_ps(t, s);
        for (int m = 0; m < mb; m++) memcpy((float *)y + (m0 + m) * N + n0, t + m * R, sizeof(float) * R);
    } else {
        uint16_t t[16];
        _mm256_storeu_si256((__m256i *)t, (__m256i)_mm512_cvtneps_pbh(s));
        for (int m = 0; m < mb; m++) memcpy((uint16_t *)y + (m0 + m) * N + n0, t + m * R, sizeof(uint16_t) * R);
    }
}

/* the weight rows [blk * RB, +RB) (fewer at the end) of gemv_bf16 for the mb x rows in xh, into y's rows m0.. */
static void gemv16_block(int64_t blk, int mb, int64_t m0, int64_t K, const uint16_t *xh, int64_t ldx,
                         const uint16_t *w, int64_t N, const float *bias, void *y, int64_t out_f32) {
    int64_t n0 = blk * RB;
    int rows = N - n0 < RB ? (int)(N - n0) : RB;
    const uint16_t *wr = w + n0 * K;
    if (rows == RB) { /* whole blocks: packed sums, stored a row's outputs at a time */
        if (mb == 1) { /* two chains per sum hide the vdpbf16ps latency, as the one-row rows_dot16 did */
            store_packed(rows_dot16_packed(1, RB, 2, wr, K, xh, ldx), 1, RB, m0, n0, N, bias, y, out_f32);
            return;
        }
        /* x rows four at a time (the sums of the pairs of weight rows this replaced, bit for bit) */
#define BLOCK(MBC)                                                                                              \
    store_packed(rows_dot16_packed(MBC, RB, 1, wr, K, xh + m * ldx, ldx), MBC, RB, m0 + m, n0, N, bias, y, out_f32)
        for (int m = 0; m < mb; m += MB) SWITCH_MB(mb - m, BLOCK);
#undef BLOCK
        return;
    }
    for (int i = 0; i < rows; i++) { /* the last rows, one at a time */
        float r[1][MB16];
#define ONE_ROW(MBC) rows_dot16(MBC, 1, 2, wr + i * K, K, xh, ldx, r)
        SWITCH_MB8(mb, ONE_ROW);
#undef ONE_ROW
        for (int m = 0; m < mb; m++) {
            int64_t n = n0 + i;
            if (out_f32)
                ((float *)y)[(m0 + m) * N + n] = bias ? r[0][m] + bias[n] : r[0][m];
            else
                store_out((uint16_t *)y + m0 * N, N, m, n, r[0][m], bias);
        }
    }
}

/* y[M, N] = x[M, K] @ w[N, K]^T (+ bias fp32 [N] or NULL); x and w bf16, row-major and contiguous.
 * y is bf16, or fp32 when out_f32 is nonzero. Any M (groups of MB16 rows), K and N. */
void gemv_bf16(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias, void *y,
               int64_t out_f32) {
#ifndef __AVX512F__
    gemv_bf16_avx2(x, M, K, w, N, bias, y, out_f32); /* the AVX2 build's own kernel (quant_cpu_gemv16_avx2.c) */
    return;
#endif
    int64_t ldx = (K + 31) / 32 * 32 + 32; /* zero padded to whole chunks; +32 keeps rows off 4 KiB aliasing */
    uint16_t *xh = calloc((size_t)(MB16 * ldx), sizeof(uint16_t));
    for (int64_t m0 = 0; m0 < M; m0 += MB16) {
        int mb = M - m0 < MB16 ? (int)(M - m0) : MB16;
        for (int m = 0; m < mb; m++) memcpy(xh + m * ldx, x + (m0 + m) * K, sizeof(uint16_t) * (size_t)K);
        PAR_FOR(N * K * 2 * mb > PAR_MIN_WORK, blk, (N + RB - 1) / RB,
                { gemv16_block(blk, mb, m0, K, xh, ldx, w, N, bias, y, out_f32); });
    }
    free(xh);
}
