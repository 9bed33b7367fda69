/* gemv_fp8 (quant_cpu_gemv8.c) for the AVX2 build: fp8 e4m3 weights widened to fp32 through F16C, fp32 FMA.
 *
 * The AVX-512 kernel looks each code up in a 128-entry bf16 table with 16-bit permutes, which quant_cpu_avx2.h can
 * only do lane by lane (about 10x slower than int8 at one row). Here 16 codes become fp16 numbers with integer
 * ops: e4m3's exponent and mantissa bits, moved up by 7, are an fp16 number with the same mantissa and an exponent
 * 8 lower (fp16's bias is 15, e4m3's 7), which covers e4m3's subnormals too (they become fp16 subnormals); the
 * sign moves to bit 15. vcvtph2ps widens them to fp32 exactly, and the 2^8 goes into the row scale. (e4m3's NaN
 * codes, which quantizers never write, become 480.) x is widened to fp32 once per call; blocks of F8_R weight rows
 * by up to F8_MB x rows keep their sums in registers, as gemv_bf16_avx2 does.
 */
#include "quant_cpu.h"

#ifndef __AVX512F__

#define F8_MB 4 /* x rows per pass over a block of weight rows */

/* 16 e4m3 codes -> fp32, divided by 2^8: elements 0-7 in a, 8-15 in b */
static inline __attribute__((always_inline)) void f8_widen(const uint8_t *p, __m256 *a, __m256 *b) {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x7F)), 7),
                                      _mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x80)), 8));
    *a = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    *b = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

static inline __attribute__((always_inline)) float f8_hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* out[r][m] = w row r . x row m (fp8 values / 2^8) for R rows of K codes (a multiple of 16) and mb x rows */
static inline __attribute__((always_inline)) void f8_rows(int R, int mb, const uint8_t *w, int64_t K, const float *xf,
                                                          int64_t ldx, float out[][F8_MB]) {
    __m256 acc[4][F8_MB], acc2[4];
    for (int r = 0; r < R; r++) {
        acc2[r] = _mm256_setzero_ps();
        for (int m = 0; m < mb; m++) acc[r][m] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < K; k += 16)
        for (int r = 0; r < R; r++) {
            const uint8_t *p = w + r * K + k;
            _mm_prefetch((const char *)(p + 4 * R * K), _MM_HINT_T0); /* this line, 4 row blocks on */
            __m256 a, b;
            f8_widen(p, &a, &b);
            for (int m = 0; m < mb; m++) {
                const float *x = xf + m * ldx + k;
                acc[r][m] = _mm256_fmadd_ps(a, _mm256_loadu_ps(x), acc[r][m]);
                if (mb == 1) /* one x row: a second chain per row hides the FMA latency */
                    acc2[r] = _mm256_fmadd_ps(b, _mm256_loadu_ps(x + 8), acc2[r]);
                else
                    acc[r][m] = _mm256_fmadd_ps(b, _mm256_loadu_ps(x + 8), acc[r][m]);
            }
        }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) out[r][m] = f8_hsum(mb == 1 ? _mm256_add_ps(acc[r][0], acc2[r]) : acc[r][m]);
}

/* weight rows [blk * R, +R) (fewer at the end) against all M x rows, F8_MB at a time */
static void f8_block(int64_t blk, int R, int64_t M, const float *xf, int64_t ldx, const uint8_t *w, int64_t K,
                     int64_t N, const float *scale, const float *bias, uint16_t *y) {
    const int64_t n0 = blk * R;
    const int rows = N - n0 < R ? (int)(N - n0) : R;
    for (int64_t m0 = 0; m0 < M; m0 += F8_MB) {
        const int mb = M - m0 < F8_MB ? (int)(M - m0) : F8_MB;
        const float *xm = xf + m0 * ldx;
        float r[4][F8_MB];
        if (rows == R && R == (mb == 1 ? 4 : 2)) {
#define BLOCK(MBC) f8_rows(MBC == 1 ? 4 : 2, MBC, w + n0 * K, K, xm, ldx, r)
            SWITCH_MB(mb, BLOCK);
#undef BLOCK
        } else {
            for (int i = 0; i < rows; i++) {
                float r1[1][F8_MB];
#define ONE_ROW(MBC) f8_rows(1, MBC, w + (n0 + i) * K, K, xm, ldx, r1)
                SWITCH_MB(mb, ONE_ROW);
#undef ONE_ROW
                for (int m = 0; m < mb; m++) r[i][m] = r1[0][m];
            }
        }
        for (int i = 0; i < rows; i++)
            for (int m = 0; m < mb; m++) store_out(y + m0 * N, N, m, n0 + i, 256.0f * scale[n0 + i] * r[i][m], bias);
    }
}

/* gemv_fp8 on AVX2 for K a multiple of 16 (the caller checks): y[M, N] = x[M, K] @ (w * scale)^T (+ bias) */
void fp8_gemv_avx2(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *scale,
                   const float *bias, uint16_t *y) {
    const int64_t ldx = K + 16; /* +16: rows off 4 KiB aliasing */
    float *xf = malloc(sizeof(float) * (size_t)(M * ldx));
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) xf[m * ldx + k] = bf16_to_f32(x[m * K + k]);
    const int R = M == 1 ? 4 : 2; /* a last group of one x row runs its rows one at a time (f8_block) */
    PAR_FOR(N * K > PAR_MIN_WORK, blk, (N + R - 1) / R, { f8_block(blk, R, M, xf, ldx, w, K, N, scale, bias, y); });
    free(xf);
}

#else
typedef int quant_cpu_fp8_avx2_unused; /* the AVX-512 build runs quant_cpu_gemv8.c's kernel */
#endif
