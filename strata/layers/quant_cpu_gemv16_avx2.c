/* gemv_bf16 (quant_cpu_gemv16.c) and gemv_fp8 (quant_cpu_gemv8.c) for the AVX2 build: weights widened to fp32 once
 * per load and multiplied with fp32 activations by FMA, each widened weight serving every activation row of the pass.
 *
 * bf16: through quant_cpu_avx2.h the AVX-512 kernel's vdpbf16ps becomes two FMAs plus the widening of both operands,
 * for every pair of weight and activation rows. Here 16 weights (one 32-byte load) widen with two integer ops into
 * their even and odd elements (8 fp32 each), and x is stored once per call as fp32 in the same order (even elements
 * of each 16, then odd ones; 64-byte aligned rows, so no load splits a cache line), so a weight row meets an x row
 * in two FMAs. From 2 x rows on, blocks of 4 weight rows meet the x rows two at a time (gb16_rows): a step's 16
 * values of both x rows stay in registers while each of the 4 weight rows is widened in turn and meets them (an odd
 * last x row: two sums per weight row, separate chains for the FMA latency); each step prefetches the next block's
 * rows (without: 0.75x at one row from L3). Its sums are bit-identical to gb_rows' 2 x 4 blocks. Against those
 * (which load each x vector once per weight row), one Zen 3 core: with 64 copies of each weight taking turns (from
 * L3) 1.0-1.9x at two rows, 1.1-1.65x at 3-16 on the bundled model's 512 x 160, 2048 x 160, 160 x 256 and SmolLM2's
 * 576 x 576; with weights from memory (benchmarks/bf16_gemv.py --code, six alternating rounds) level with them
 * within the machine's noise: rounds' medians 0.81-1.41x on six shapes at 2-16 rows, where the identical one-row
 * code spread 0.87-1.14x (docs/benchmarks.md). One x row keeps gb_rows' 4 x 1 blocks (the pairs' kernel at one
 * row: 0.95-1.15x in that loop, and the bundled model's one-sequence decode step ran 1.15x slower with it, rounds'
 * median of 9). A weight over
 * GEMV_BF16_MAX_BYTES (from memory) keeps gb_rows from 3 x rows on: two passes of pairs over 4 KiB rows ran
 * 0.8-0.9x its one pass there.
 *
 * fp8 e4m3: the AVX-512 kernel looks each code up in a 128-entry bf16 table with 16-bit permutes, which
 * quant_cpu_avx2.h can only do lane by lane (about 10x slower than int8 at one row). Here 16 codes become fp16
 * numbers with integer ops: e4m3's exponent and mantissa bits, moved up by 7, are an fp16 number with the same
 * mantissa and an exponent 8 lower (fp16's bias is 15, e4m3's 7), which covers e4m3's subnormals too (they become
 * fp16 subnormals); the sign moves to bit 15. vcvtph2ps widens them to fp32 exactly (elements 0-7, then 8-15; x is
 * stored in its natural order), and the 2^8 goes into the row scale. (e4m3's NaN codes, which quantizers never
 * write, become 480.) 9.6x the translated kernel at one row, 7x at 4, 2x at 16.
 *
 * gb_rows (fp8, and bf16 weights from memory at 3+ x rows): blocks of R weight rows by up to GB_MB x rows keep their
 * sums in registers: 4 x 1 at one x row (two sums per row: separate chains hide the FMA latency), 2 x 4 beyond.
 */
#include "quant_cpu.h"

#ifndef __AVX512F__

#define GB_MB 4 /* x rows per pass over a block of weight rows */

enum { GB_BF16 = 0, GB_FP8 = 1 }; /* weight types */

/* 16 weights at element k of a row as fp32: bf16's even and odd elements into a and b; fp8's elements 0-7 and 8-15,
 * divided by 2^8 */
static inline __attribute__((always_inline)) void gb_widen(int wt, const uint8_t *row, int64_t k, __m256 *a,
                                                           __m256 *b) {
    if (wt == GB_FP8) {
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(row + k)));
        const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x7F)), 7),
                                          _mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x80)), 8));
        *a = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
        *b = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
        return;
    }
    __m256i v = _mm256_loadu_si256((const __m256i *)(row + 2 * k));
    *a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
}

/* out[r][m] = w row r . x row m for R rows of K weights of type wt (K a multiple of 16; ldw bytes apart) and mb x
 * rows of xf (ldx fp32 apart, in gb_widen's order) */
static inline __attribute__((always_inline)) void gb_rows(int wt, int R, int mb, const uint8_t *w, int64_t ldw,
                                                          int64_t K, const float *xf, int64_t ldx,
                                                          float out[][GB_MB]) {
    __m256 acc[4][GB_MB], acc2[4];
    for (int r = 0; r < R; r++) {
        acc2[r] = _mm256_setzero_ps();
        for (int m = 0; m < mb; m++) acc[r][m] = _mm256_setzero_ps();
    }
    /* bf16: this line of the next block's row; fp8 (16-byte steps): 4 row blocks on */
    const int64_t ahead = (wt == GB_FP8 ? 4 : 1) * R * ldw;
    for (int64_t k = 0; k < K; k += 16) {
        for (int r = 0; r < R; r++) {
            const uint8_t *row = w + r * ldw;
            _mm_prefetch((const char *)(row + ahead + (wt == GB_FP8 ? k : 2 * k)), _MM_HINT_T0);
            __m256 e, o;
            gb_widen(wt, row, k, &e, &o);
            for (int m = 0; m < mb; m++) {
                const float *x = xf + m * ldx + k;
                acc[r][m] = _mm256_fmadd_ps(e, _mm256_loadu_ps(x), acc[r][m]);
                if (mb == 1) /* one x row: a second chain per row hides the FMA latency */
                    acc2[r] = _mm256_fmadd_ps(o, _mm256_loadu_ps(x + 8), acc2[r]);
                else
                    acc[r][m] = _mm256_fmadd_ps(o, _mm256_loadu_ps(x + 8), acc[r][m]);
            }
        }
    }
    /* the R * mb <= 8 sums through one transpose tree (s5_sum8), lane r * mb + m */
    __m256 v[8];
    for (int i = 0; i < 8; i++)
        v[i] = i >= R * mb ? _mm256_setzero_ps()
                           : mb == 1 ? _mm256_add_ps(acc[i][0], acc2[i]) : acc[i / mb][i % mb];
    float t[8];
    _mm256_storeu_ps(t, s5_sum8(v));
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) out[r][m] = t[r * mb + m];
}

/* y[m, n] = v (fp8: times 2^8 and the row's scale) + bias[n], bf16 or fp32 (out_f32) */
static inline void gb_store(float v, int64_t m, int64_t n, int64_t N, const float *scale, const float *bias, void *y,
                            int64_t out_f32) {
    if (scale) v *= 256.0f * scale[n];
    if (bias) v += bias[n];
    if (out_f32)
        ((float *)y)[m * N + n] = v;
    else
        ((uint16_t *)y)[m * N + n] = f32_to_bf16(v);
}

/* weight rows [blk * R, +R) (fewer at the end) against all M x rows, GB_MB at a time: the block's rows stay in L1
 * from the first group of x rows to the last */
static inline __attribute__((always_inline)) void gb_block(int wt, int64_t blk, int R, int64_t M, const float *xf,
                                                           int64_t ldx, const uint8_t *w, int64_t K, int64_t N,
                                                           const float *scale, const float *bias, void *y,
                                                           int64_t out_f32) {
    const int64_t n0 = blk * R, ldw = wt == GB_FP8 ? K : 2 * K;
    const int rows = N - n0 < R ? (int)(N - n0) : R;
    for (int64_t m0 = 0; m0 < M; m0 += GB_MB) {
        const int mb = M - m0 < GB_MB ? (int)(M - m0) : GB_MB;
        const float *xm = xf + m0 * ldx;
        float r[4][GB_MB];
        if (rows == R && R == (mb == 1 ? 4 : 2)) {
#define BLOCK(MBC) gb_rows(wt, MBC == 1 ? 4 : 2, MBC, w + n0 * ldw, ldw, K, xm, ldx, r)
            SWITCH_MB(mb, BLOCK);
#undef BLOCK
        } else {
            for (int i = 0; i < rows; i++) {
                float r1[1][GB_MB];
#define ONE_ROW(MBC) gb_rows(wt, 1, MBC, w + (n0 + i) * ldw, ldw, K, xm, ldx, r1)
                SWITCH_MB(mb, ONE_ROW);
#undef ONE_ROW
                for (int m = 0; m < mb; m++) r[i][m] = r1[0][m];
            }
        }
        for (int i = 0; i < rows; i++)
            for (int m = 0; m < mb; m++) gb_store(r[i][m], m0 + m, n0 + i, N, scale, bias, y, out_f32);
    }
}

/* R <= 4 weight rows of K bf16 at w against mb <= 2 x rows of xf (ldx apart, K fp32 in gb_widen's order):
 * out[r * 2 + m]. The x rows' 16 values of a step stay in registers while each weight row is widened in turn and
 * meets them (one x row: two sums per weight row, separate chains for the FMA latency) */
static inline __attribute__((always_inline)) void gb16_rows(int R, int mb, const uint16_t *w, int64_t K,
                                                           const float *xf, int64_t ldx, float out[8]) {
    __m256 a[4][2];
    for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __m256 xe[2], xo[2];
        for (int m = 0; m < mb; m++) {
            xe[m] = _mm256_loadu_ps(xf + m * ldx + k);
            xo[m] = _mm256_loadu_ps(xf + m * ldx + k + 8);
        }
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(w + (r + 4) * K + k), _MM_HINT_T0); /* the next block's row (PREFETCH) */
            __m256 e, o;
            gb_widen(GB_BF16, (const uint8_t *)(w + r * K), k, &e, &o);
            if (mb == 1) {
                a[r][0] = _mm256_fmadd_ps(e, xe[0], a[r][0]);
                a[r][1] = _mm256_fmadd_ps(o, xo[0], a[r][1]);
            } else {
                for (int m = 0; m < mb; m++) a[r][m] = _mm256_fmadd_ps(o, xo[m], _mm256_fmadd_ps(e, xe[m], a[r][m]));
            }
        }
    }
    /* the 8 sums through one transpose tree (s5_sum8), lane r * 2 + m (one x row: its two chains added) */
    __m256 v[8];
    for (int r = 0; r < 4; r++) {
        v[2 * r] = mb == 1 ? _mm256_add_ps(a[r][0], a[r][1]) : a[r][0];
        v[2 * r + 1] = mb == 1 ? _mm256_setzero_ps() : a[r][1];
    }
    _mm256_storeu_ps(out, s5_sum8(v));
}

/* weight rows [blk * 4, +4) (fewer at the end) against every x row, two at a time */
static inline __attribute__((always_inline)) void gb16_block(int64_t blk, int64_t M, const float *xf, int64_t ldx,
                                                            const uint16_t *w, int64_t K, int64_t N,
                                                            const float *bias, void *y, int64_t out_f32) {
    const int64_t n0 = blk * 4;
    const int rows = N - n0 < 4 ? (int)(N - n0) : 4;
    for (int64_t m0 = 0; m0 < M; m0 += 2) {
        const int mb = M - m0 < 2 ? 1 : 2;
        float t[8];
        const uint16_t *wr = w + n0 * K;
        const float *xm = xf + m0 * ldx;
#define ROWS(RC) (mb == 1 ? gb16_rows(RC, 1, wr, K, xm, ldx, t) : gb16_rows(RC, 2, wr, K, xm, ldx, t))
        switch (rows) {
        case 1: ROWS(1); break;
        case 2: ROWS(2); break;
        case 3: ROWS(3); break;
        default: ROWS(4); break;
        }
#undef ROWS
        for (int r = 0; r < rows; r++)
            for (int m = 0; m < mb; m++) gb_store(t[2 * r + m], m0 + m, n0 + r, N, NULL, bias, y, out_f32);
    }
}

/* gemv_bf16 on AVX2: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), x and w bf16; y bf16 or fp32 (out_f32) */
void gemv_bf16_avx2(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias,
                    void *y, int64_t out_f32) {
    if (K % 16) { /* rows that do not split into whole loads: a copy padded with zeros */
        int64_t Kp = (K + 15) / 16 * 16;
        uint16_t *wp = calloc((size_t)(N * Kp), sizeof(uint16_t)), *xp = calloc((size_t)(M * Kp), sizeof(uint16_t));
        for (int64_t n = 0; n < N; n++) memcpy(wp + n * Kp, w + n * K, sizeof(uint16_t) * (size_t)K);
        for (int64_t m = 0; m < M; m++) memcpy(xp + m * Kp, x + m * K, sizeof(uint16_t) * (size_t)K);
        gemv_bf16_avx2(xp, M, Kp, wp, N, bias, y, out_f32);
        free(xp);
        free(wp);
        return;
    }
    const int64_t ldx = K + 16; /* +16: rows off 4 KiB aliasing; a multiple of 16 floats: no load splits a line */
    float *xf = aligned_alloc(64, sizeof(float) * (size_t)(M * ldx));
    for (int64_t m = 0; m < M; m++) /* widened as the weights are: even elements of each 16, then odd ones */
        for (int64_t k = 0; k < K; k += 16) {
            __m256 e, o;
            gb_widen(GB_BF16, (const uint8_t *)(x + m * K), k, &e, &o);
            _mm256_store_ps(xf + m * ldx + k, e);
            _mm256_store_ps(xf + m * ldx + k + 8, o);
        }
    const int par = N * K * 2 * M > PAR_MIN_WORK; /* the work grows with the rows, as the quantized GEMVs count it */
    if (M == 1) /* 4 weight rows, two sums each */
        PAR_FOR(par, blk, (N + 3) / 4, { gb_block(GB_BF16, blk, 4, 1, xf, ldx, (const uint8_t *)w, K, N, NULL, bias,
                                                  y, out_f32); });
    else if (M == 2 || N * K * 2 <= GEMV_BF16_MAX_BYTES)
        PAR_FOR(par, blk, (N + 3) / 4, { gb16_block(blk, M, xf, ldx, w, K, N, bias, y, out_f32); });
    else /* from memory, more x rows: one pass of 2 weight rows by 4 x rows (two passes of pairs: 0.8-0.9x) */
        PAR_FOR(par, blk, (N + 1) / 2, { gb_block(GB_BF16, blk, 2, M, xf, ldx, (const uint8_t *)w, K, N, NULL, bias,
                                                  y, out_f32); });
    free(xf);
}

/* gemv_fp8 on AVX2 for K a multiple of 16 (the caller checks): y[M, N] = x[M, K] @ (w * scale)^T (+ bias) */
void fp8_gemv_avx2(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *scale,
                   const float *bias, uint16_t *y) {
    const int64_t ldx = K + 16; /* +16: rows off 4 KiB aliasing */
    float *xf = malloc(sizeof(float) * (size_t)(M * ldx));
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) xf[m * ldx + k] = bf16_to_f32(x[m * K + k]);
    const int R = M == 1 ? 4 : 2;
    PAR_FOR(N * K > PAR_MIN_WORK, blk, (N + R - 1) / R,
            { gb_block(GB_FP8, blk, R, M, xf, ldx, w, K, N, scale, bias, y, 0); });
    free(xf);
}

#else
typedef int quant_cpu_gemv16_avx2_unused; /* the AVX-512 build runs quant_cpu_gemv16.c's kernel */
#endif
