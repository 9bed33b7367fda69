/* Batched GEMM for the weight kinds WK_* of quant_cpu.h: y [M, N] = x [M, K] @ W^T (+ bias), bf16 in and out, for
 * the row counts above the GEMVs' (decode batches of several sequences, prompts).
 *
 * The weight is dequantized to bf16 a tile of rows (GM_TILE_BYTES) at a time into a per-thread buffer that stays in L1
 * (the dequant_* functions of the other files, so every weight is the bf16 number the dequantize-then-matmul path
 * gives), and every block of up to GM_MR activation rows meets every block of GM_NR tile rows in registers: up to
 * 20 accumulators of 16 fp32 partial sums along K, fed by vdpbf16ps, reduced once at the end by sum16. So the
 * weight is read from memory once, no bf16 copy of it is written out and read back, and there is no call per
 * tile; only the order of the fp32 additions differs from the matmul's. bf16 weights are read in place, and the
 * next tile's lines are prefetched in address order, spread over the current tile's register blocks in proportion
 * to their rows: issued as a burst at the start of a tile, they left the loads and the vdpbf16ps waiting on the
 * memory (8-16 rows on OLMoE's [2048, 2048] ran 1.3x slower, not overlapping memory and compute); spread, one
 * thread streams a weight at up to ~37 GB/s where gemv_bf16 reached ~29.
 */
#include "quant_cpu.h"

#define GM_MR 5 /* activation rows per register block, at most: 20 accumulators (gcc spilled 24 of 6 rows) */
#define GM_NR 4 /* weight rows per register block: 4 x rows meet them in 16 accumulators, one sum16 */
#define GM_TILE_BYTES (16 * 1024) /* bf16 bytes dequantized per tile: stays in L1 beside GM_MR rows of x */

/* bytes of one weight row, and of its scales and zero points, for the layouts in quant_cpu.h */
static void weight_row_bytes(int kind, int64_t K, int64_t G, int64_t *w, int64_t *s, int64_t *z) {
    static const int64_t kq[3] = {144, 176, 210};
    *s = *z = 0;
    switch (kind) {
    case WK_BF16: *w = 2 * K; break;
    case WK_INT8: case WK_FP8: *w = K, *s = 4; break;
    case WK_NESTED: *w = K, *s = 2 * ((K + G - 1) / G); break;
    case WK_Q4K: case WK_Q5K: case WK_Q6K: *w = K / 256 * kq[kind - WK_Q4K]; break;
    case WK_Q8_0: *w = K / 32 * 34; break; /* blocks carry their scales (G is 0: no division by it) */
    case WK_Q4_1: *w = K / 32 * 20; break;
    case WK_Q5_0: *w = K / 32 * 22; break;
    case WK_Q5_1: *w = K / 32 * 24; break;
    default: *w = K / 2, *s = 2 * (K / G), *z = K / G; break;
    }
}

/* rows [n0, n1) of a weight of kind `kind` -> out bf16 [n1 - n0, K] (bf16 weights are not copied: see gm_tiles) */
static void gm_dequant(int kind, const void *w, const void *s, const void *z, int64_t K, int64_t G, int64_t n0,
                       int64_t n1, uint16_t *out) {
    switch (kind) {
    case WK_INT8: dequant_int8(w, K, s, n0, n1, out); break;
    case WK_FP8: dequant_fp8(w, K, s, n0, n1, out); break;
    case WK_NESTED: dequant_nested(w, K, G, s, n0, n1, out); break;
    case WK_Q4K: case WK_Q5K: case WK_Q6K: dequant_kq(kind - WK_Q4K, w, K, n0, n1, out); break;
    case WK_Q8_0: case WK_Q4_1: case WK_Q5_0: case WK_Q5_1: dequant_qb(kind - WK_Q8_0, w, K, n0, n1, out); break;
    default: dequant_int4(w, K, G, s, z, n0, n1, out); break;
    }
}

/* out[i / 16] lane i % 16 = x row (i / GM_NR) . t row (i % GM_NR) over K, for MR x rows (ldx apart) and GM_NR t
 * rows (K apart): out[1] holds x row 4. Also prefetches the npf cache lines from pf, spread evenly over
 * the steps along K. Each sum is its own chain along K, reduced by sum16: the same whatever MR. */
static inline __attribute__((always_inline)) void gm_block(int MR, int PF, const uint16_t *x, int64_t ldx,
                                                           const uint16_t *t, int64_t K, const char *pf,
                                                           int64_t npf, __m512 out[2]) {
    /* x rows 0-3 and 4 in two arrays: gcc kept one array of 20 in memory, storing it at every step */
    __m512 acc[16], acc2[GM_NR];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    for (int i = 0; i < GM_NR; i++) acc2[i] = _mm512_setzero_ps();
    const int64_t steps = (K + 31) / 32;
    int64_t due = 0; /* Bresenham: npf lines over `steps` steps */
    for (int64_t k = 0; k < K; k += 32) {
        const __mmask32 mk = K - k >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << (K - k)) - 1);
        if (PF) /* compiled out for dequantized tiles: the bookkeeping alone slowed int4's GEMM 5-10% */
            for (due += npf; due >= steps; due -= steps, pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
        __m512bh wv[GM_NR];
        for (int n = 0; n < GM_NR; n++) wv[n] = AS_BH(_mm512_maskz_loadu_epi16(mk, t + n * K + k));
        for (int m = 0; m < MR; m++) {
            __m512bh xv = AS_BH(_mm512_maskz_loadu_epi16(mk, x + m * ldx + k));
            for (int n = 0; n < GM_NR; n++) {
                if (m < 4)
                    acc[m * GM_NR + n] = _mm512_dpbf16_ps(acc[m * GM_NR + n], xv, wv[n]);
                else
                    acc2[(m - 4) * GM_NR + n] = _mm512_dpbf16_ps(acc2[(m - 4) * GM_NR + n], xv, wv[n]);
            }
        }
    }
    __m512 v[16]; /* a copy: handing acc itself to sum16 kept it in memory through the loop */
    for (int i = 0; i < 16; i++) v[i] = acc[i];
    out[0] = sum16(v);
    if (MR > 4) {
        for (int i = 0; i < 16; i++) v[i] = i < GM_NR ? acc2[i] : _mm512_setzero_ps();
        out[1] = sum16(v);
    }
}

/* tiles [t0, t1) of GM_TILE-row tiles: dequantize each into buf, then all of x against it */
static void gm_tiles(int kind, const uint16_t *x, int64_t ldx, int64_t M, int64_t K, const void *w, const void *s,
                     const void *z, int64_t N, int64_t G, const float *bias, uint16_t *y, int64_t tile, int64_t t0,
                     int64_t t1, uint16_t *buf) {
    int64_t rb[3]; /* bytes per row of w, s, z */
    weight_row_bytes(kind, K, G, &rb[0], &rb[1], &rb[2]);
    const uint8_t *base[3] = {w, s, z};
    /* x rows in blocks of at most GM_MR, as even as can be: 9 rows as 4 + 5, 6 as 3 + 3 (blocks of 4 + 1 and 4 + 2
     * ran 10-20% slower on bf16 [2048, 2048] and [2048, 1024]); the last `wide` blocks get narrow + 1 rows */
    const int64_t nblk = (M + GM_MR - 1) / GM_MR, narrow = M / nblk, wide = M % nblk;
    for (int64_t tt = t0; tt < t1; tt++) {
        const int64_t n0 = tt * tile, rows = N - n0 < tile ? N - n0 : tile;
        const int64_t padded = (rows + GM_NR - 1) / GM_NR * GM_NR;
        /* the next tile's bytes, a share per block of rows below: its dequantization then finds them in cache */
        const int64_t next = tt + 1 < t1 ? (N - n0 - rows < tile ? N - n0 - rows : tile) : 0;
        int64_t lines[3], done[3] = {0, 0, 0};
        for (int a = 0; a < 3; a++) lines[a] = base[a] && kind != WK_BF16 ? (next * rb[a] + 63) / 64 : 0;
        /* bf16: the next tile's lines spread over the tile's register blocks, in proportion to their x rows */
        const int64_t units = padded / GM_NR * M, next_lines = kind == WK_BF16 ? (next * K * 2 + 63) / 64 : 0;
        const char *next_tile = (const char *)((const uint16_t *)w + (n0 + rows) * K);
        const uint16_t *t = buf;
        if (kind == WK_BF16 && rows == padded)
            t = (const uint16_t *)w + n0 * K;
        else if (kind == WK_BF16)
            memcpy(buf, (const uint16_t *)w + n0 * K, sizeof(uint16_t) * (size_t)(rows * K));
        else
            gm_dequant(kind, w, s, z, K, G, n0, n0 + rows, buf);
        if (t == buf && padded > rows) /* the last tile's missing rows read as zeros */
            memset(buf + rows * K, 0, sizeof(uint16_t) * (size_t)((padded - rows) * K));
        for (int64_t nb = 0; nb < padded; nb += GM_NR) {
            const int nr = rows - nb < GM_NR ? (int)(rows - nb) : GM_NR;
            for (int a = 0; a < 3; a++) {
                const int64_t until = lines[a] * (nb + GM_NR) / padded;
                for (; done[a] < until; done[a]++)
                    _mm_prefetch((const char *)(base[a] + (n0 + rows) * rb[a] + 64 * done[a]), _MM_HINT_T0);
            }
            for (int64_t b = 0, m0 = 0; b < nblk; b++) {
                const int mr = (int)(b < nblk - wide ? narrow : narrow + 1);
                int64_t npf = 0, l0 = 0; /* no divisions for dequantized tiles: they showed in int4's GEMM */
                if (next_lines) {
                    const int64_t u0 = nb / GM_NR * M + m0;
                    l0 = next_lines * u0 / units;
                    npf = next_lines * (u0 + mr) / units - l0;
                }
                const char *pf = next_tile + 64 * l0;
                __m512 r[2];
#define GM_BLOCK(MRC)                                                                                           \
    (npf ? gm_block(MRC, 1, x + m0 * ldx, ldx, t + nb * K, K, pf, npf, r)                                       \
         : gm_block(MRC, 0, x + m0 * ldx, ldx, t + nb * K, K, pf, npf, r))
                switch (mr) {
                case 1: GM_BLOCK(1); break;
                case 2: GM_BLOCK(2); break;
                case 3: GM_BLOCK(3); break;
                case 4: GM_BLOCK(4); break;
                default: GM_BLOCK(5); break;
                }
#undef GM_BLOCK
                const int64_t n = n0 + nb;
                for (int hb = 0; hb * 4 < mr; hb++) { /* x rows m0 + 4 hb .. */
                    const int hr = mr - 4 * hb < 4 ? mr - 4 * hb : 4;
                    uint16_t *yh = y + (m0 + 4 * hb) * N;
                    if (nr < GM_NR) {
                        float v[16];
                        _mm512_storeu_ps(v, r[hb]);
                        for (int m = 0; m < hr; m++)
                            for (int j = 0; j < nr; j++) store_out(yh, N, m, n + j, v[m * GM_NR + j], bias);
                        continue;
                    }
                    if (bias) /* lane m * GM_NR + j holds output (m, n + j) */
                        r[hb] = _mm512_add_ps(r[hb], _mm512_broadcast_f32x4(_mm_loadu_ps(bias + n)));
                    int64_t q[4];
                    _mm256_storeu_si256((__m256i *)q, (__m256i)_mm512_cvtneps_pbh(r[hb]));
                    for (int m = 0; m < hr; m++) memcpy(yh + m * N + n, &q[m], 8);
                }
                m0 += mr;
            }
        }
    }
}

/* y [M, N] = x [M, K] @ W^T (+ bias) for a weight of kind WK_* (not mxfp4): x bf16 contiguous (K padded to the
 * group for grouped kinds), s: scales, z: zero points or NULL, bias fp32 or NULL; threads split the tiles */
void gemm_dq(int64_t kind, const uint16_t *x, int64_t M, int64_t K, const void *w, const void *s, const void *z,
             int64_t N, int64_t G, const float *bias, uint16_t *y) {
#ifndef __AVX512F__
    if (kind >= WK_Q8_0 && kind <= WK_Q5_1) { /* AVX2: the blocks' own kernel beat this one at every M (1-256) */
        qb_gemv_avx2((int)(kind - WK_Q8_0), 0, x, M, K, (const uint8_t *)w, N, bias, y);
        return;
    }
    if (kind == WK_INT4 && G % 32 == 0) { /* and int4's and int8's on int16 activations (quant_cpu_q32x16_avx2.c) */
        int4_gemv_x16_avx2(x, M, K, (const uint8_t *)w, N, G, (const uint16_t *)s, (const uint8_t *)z, bias, y);
        return;
    }
    if (kind >= WK_Q4K && kind <= WK_Q6K) {
        kq_gemv_x16_avx2((int)(kind - WK_Q4K), x, M, K, (const uint8_t *)w, N, bias, y);
        return;
    }
    if (kind == WK_FP8 && K % 16 == 0) { /* fp8 through F16C (quant_cpu_gemv16_avx2.c) */
        fp8_gemv_avx2(x, M, K, (const uint8_t *)w, N, (const float *)s, bias, y);
        return;
    }
    if (kind == WK_INT8 && K % 32 == 0) {
        int8_gemv_x16_avx2(x, M, K, (const int8_t *)w, N, (const float *)s, bias, y);
        return;
    }
#endif
    int64_t tile = GM_TILE_BYTES / (2 * K) / GM_NR * GM_NR;
    if (tile < GM_NR) tile = GM_NR;
    const int64_t ntiles = (N + tile - 1) / tile;
    const size_t buf_bytes = (sizeof(uint16_t) * (size_t)(tile * K) + 63) / 64 * 64;
    /* 64-byte loads of x rows that straddle cache lines cost two: x rows not on 64-byte boundaries (a malloc'd
     * buffer, an odd K) are copied to ones that are (OLMoE's experts in the MoE call ran 1.4x slower without) */
    int64_t ldx = K;
    uint16_t *xa = NULL;
    if ((uintptr_t)x % 64 || (K * sizeof(uint16_t)) % 64) {
        ldx = (K + 31) / 32 * 32;
        xa = aligned_alloc(64, sizeof(uint16_t) * (size_t)(M * ldx));
        for (int64_t m = 0; m < M; m++) memcpy(xa + m * ldx, x + m * K, sizeof(uint16_t) * (size_t)K);
        x = xa;
    }
    /* a few microseconds of work, or one thread: a team would cost more than it saves (a MoE step makes ~900 calls) */
    if (M * N * K <= 8 * PAR_MIN_WORK || omp_get_max_threads() == 1) {
        uint16_t *buf = aligned_alloc(64, buf_bytes);
        gm_tiles((int)kind, x, ldx, M, K, w, s, z, N, G, bias, y, tile, 0, ntiles, buf);
        free(buf);
    } else {
#pragma omp parallel
        {
            const int64_t nth = omp_get_num_threads(), id = omp_get_thread_num();
            const int64_t t0 = ntiles * id / nth, t1 = ntiles * (id + 1) / nth;
            uint16_t *buf = aligned_alloc(64, buf_bytes);
            gm_tiles((int)kind, x, ldx, M, K, w, s, z, N, G, bias, y, tile, t0, t1, buf);
            free(buf);
        }
    }
    free(xa);
}
