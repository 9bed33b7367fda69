/* The GEMV of quant_cpu_q32.c (GGUF's Q8_0, Q4_1, Q5_0 and Q5_1 blocks) for the AVX2 build and fp32 activations
 * (gemv_qb_f32; bf16 ones go to quant_cpu_q32x16_avx2.c): codes widened to fp32 and multiplied with the
 * activations by FMA, for up to QBA_MB activation rows per pass.
 *
 * The AVX-512 kernel turns codes into bf16 numbers for vdpbf16ps; through quant_cpu_avx2.h each of those becomes
 * two FMAs plus the splitting of both operands, and its register blocking spills on 16 registers. Here a block's
 * 32 codes become four vectors of 8 fp32 with one widening shuffle: the 16 bytes of nibbles, widened to 16-bit
 * lanes, hold weights 2j and 2j + 1 (low nibbles) and 16 + 2j and 17 + 2j (high nibbles) in 32-bit lane j, which
 * masks and shifts take out in place; x is stored once per call in that order (even, odd, even + 16, odd + 16 per
 * block). Q8_0's 32 int8 codes widen 8 at a time in their own order. Each block's dot products (fp32, as exact
 * as fp32 arithmetic) are scaled by its d, and the offset m (q4_1, q5_1) or -16 d (q5_0) meets the block's sum of x.
 */
#include "quant_cpu.h"

#ifndef __AVX512F__

enum { QBA8_0 = 0, QBA4_1 = 1, QBA5_0 = 2, QBA5_1 = 3 }; /* quant_cpu_q32.c's kinds */
static const int64_t QBA_BYTES[4] = {34, 20, 22, 24};
#define QBA_MB 4 /* activation rows per pass over the weights */

/* x element e (0..31) of a block -> its slot in the stored order */
static inline int qba_slot(int kind, int e) {
    if (kind == QBA8_0) return e;
    int hi = e >= 16, k = e & 15;
    return 16 * hi + 8 * (k & 1) + k / 2;
}

/* the four vectors of one block's codes, as fp32 in the stored order */
static inline __attribute__((always_inline)) void qba_codes(int kind, const uint8_t *b, __m256 c[4]) {
    if (kind == QBA8_0) {
        for (int i = 0; i < 4; i++)
            c[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * i))));
        return;
    }
    const int64_t B = QBA_BYTES[kind];
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + B - 16)));
    const __m256i m4 = _mm256_set1_epi32(0xF);
    __m256i q[4] = {_mm256_and_si256(v, m4), _mm256_and_si256(_mm256_srli_epi32(v, 16), m4),
                    _mm256_and_si256(_mm256_srli_epi32(v, 4), m4), _mm256_and_si256(_mm256_srli_epi32(v, 20), m4)};
    if (kind == QBA5_0 || kind == QBA5_1) { /* bit k of qh is bit 4 of weight k */
        uint32_t qh;
        memcpy(&qh, b + B - 20, 4);
        const __m256i h = _mm256_set1_epi32((int)qh), one = _mm256_set1_epi32(1);
        const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        for (int i = 0; i < 4; i++) {
            __m256i sh = _mm256_add_epi32(even, _mm256_set1_epi32((i & 1) + 16 * (i >> 1)));
            q[i] = _mm256_or_si256(q[i], _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(h, sh), one), 4));
        }
    }
    for (int i = 0; i < 4; i++) c[i] = _mm256_cvtepi32_ps(q[i]);
}

/* one block's scale d and offset per unit of x */
static inline __attribute__((always_inline)) void qba_factors(int kind, const uint8_t *b, float *d, float *c) {
    *d = half_at(b);
    *c = kind == QBA4_1 || kind == QBA5_1 ? half_at(b + 2) : kind == QBA5_0 ? -16.0f * *d : 0.0f;
}

static inline __attribute__((always_inline)) float qba_hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* out[r][m] = row r . x row m for R rows of ldw bytes; xf: mb rows of K fp32 in stored order, xs their block sums */
static inline __attribute__((always_inline)) void qba_rows(int kind, int mb, int R, const uint8_t *w, int64_t ldw,
                                                           int64_t nb, const float *xf, const float *xs, int64_t K,
                                                           float out[][QBA_MB]) {
    const int64_t B = QBA_BYTES[kind];
    __m256 acc[4][QBA_MB];
    float off[4][QBA_MB];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) acc[r][m] = _mm256_setzero_ps(), off[r][m] = 0.0f;
    for (int64_t j = 0; j < nb; j++) {
        for (int r = 0; r < R; r++) {
            const uint8_t *b = w + r * ldw + j * B;
            _mm_prefetch((const char *)(b + 4 * R * ldw), _MM_HINT_T0); /* the same block 4 row groups on */
            __m256 c[4];
            float d, o;
            qba_codes(kind, b, c);
            qba_factors(kind, b, &d, &o);
            const __m256 dv = _mm256_set1_ps(d);
            for (int m = 0; m < mb; m++) {
                const float *x = xf + m * K + 32 * j;
                __m256 p = _mm256_fmadd_ps(c[1], _mm256_loadu_ps(x + 8), _mm256_mul_ps(c[0], _mm256_loadu_ps(x)));
                __m256 q = _mm256_fmadd_ps(c[3], _mm256_loadu_ps(x + 24), _mm256_mul_ps(c[2], _mm256_loadu_ps(x + 16)));
                acc[r][m] = _mm256_fmadd_ps(_mm256_add_ps(p, q), dv, acc[r][m]);
                off[r][m] += o * xs[m * nb + j];
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) out[r][m] = qba_hsum(acc[r][m]) + off[r][m];
}

/* the weight rows [blk * R, +R) (fewer at the end) against the mb x rows of this pass, into y's rows m0.. */
static inline __attribute__((always_inline)) void qba_block(int kind, int f32, int mb, int64_t blk, int64_t m0,
                                                            const uint8_t *w, int64_t ldw, int64_t nb, int64_t N,
                                                            int64_t K, const float *xf, const float *xs,
                                                            const float *bias, void *y) {
    const int R = mb == 1 ? 4 : 2;
    const int64_t n0 = blk * R;
    const int rows = N - n0 < R ? (int)(N - n0) : R;
    float r[4][QBA_MB];
    if (rows == R) {
#define BLOCK(MBC) qba_rows(kind, MBC, MBC == 1 ? 4 : 2, w + n0 * ldw, ldw, nb, xf, xs, K, r)
        SWITCH_MB(mb, BLOCK);
#undef BLOCK
    } else {
        for (int i = 0; i < rows; i++) {
            float r1[1][QBA_MB];
#define ONE_ROW(MBC) qba_rows(kind, MBC, 1, w + (n0 + i) * ldw, ldw, nb, xf, xs, K, r1)
            SWITCH_MB(mb, ONE_ROW);
#undef ONE_ROW
            for (int m = 0; m < mb; m++) r[i][m] = r1[0][m];
        }
    }
    for (int i = 0; i < rows; i++)
        for (int m = 0; m < mb; m++) {
            if (f32)
                ((float *)y)[(m0 + m) * N + n0 + i] = bias ? r[i][m] + bias[n0 + i] : r[i][m];
            else
                store_out((uint16_t *)y + m0 * N, N, m, n0 + i, r[i][m], bias);
        }
}

static inline __attribute__((always_inline)) void qba_gemv(int kind, int f32, const void *x_in, int64_t M, int64_t K,
                                                           const uint8_t *w, int64_t N, const float *bias, void *y) {
    const int64_t nb = K / 32, ldw = nb * QBA_BYTES[kind];
    float *xf = malloc(sizeof(float) * (size_t)(QBA_MB * K)), *xs = malloc(sizeof(float) * (size_t)(QBA_MB * nb));
    for (int64_t m0 = 0; m0 < M; m0 += QBA_MB) {
        const int mb = M - m0 < QBA_MB ? (int)(M - m0) : QBA_MB;
        for (int m = 0; m < mb; m++)
            for (int64_t j = 0; j < nb; j++) {
                float s = 0.0f;
                for (int e = 0; e < 32; e++) {
                    int64_t k = (m0 + m) * K + 32 * j + e;
                    float v = f32 ? ((const float *)x_in)[k] : bf16_to_f32(((const uint16_t *)x_in)[k]);
                    xf[m * K + 32 * j + qba_slot(kind, e)] = v;
                    s += v;
                }
                xs[m * nb + j] = s;
            }
        const int64_t nblocks = (N + (mb == 1 ? 4 : 2) - 1) / (mb == 1 ? 4 : 2);
        PAR_FOR(N * ldw * mb > PAR_MIN_WORK, blk, nblocks,
                { qba_block(kind, f32, mb, blk, m0, w, ldw, nb, N, K, xf, xs, bias, y); });
    }
    free(xs);
    free(xf);
}

/* gemv_qb_f32 (f32 = 1: x, y fp32) on AVX2, any M, one compiled copy per kind; gemv_qb (0: x bf16, y bf16) goes to
 * quant_cpu_q32x16_avx2.c's kernel on int16 activations */
void qb_gemv_avx2(int kind, int f32, const void *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
                  const float *bias, void *y) {
    if (!f32) { /* bf16: on int16 activations */
        qb_gemv_x16_avx2(kind, (const uint16_t *)x, M, K, w, N, bias, (uint16_t *)y);
        return;
    }
    switch (kind) {
    case QBA4_1: qba_gemv(QBA4_1, 1, x, M, K, w, N, bias, y); break;
    case QBA5_0: qba_gemv(QBA5_0, 1, x, M, K, w, N, bias, y); break;
    case QBA5_1: qba_gemv(QBA5_1, 1, x, M, K, w, N, bias, y); break;
    default: qba_gemv(QBA8_0, 1, x, M, K, w, N, bias, y);
    }
}

#else
typedef int quant_cpu_q32_avx2_unused; /* the AVX-512 build has its own kernel (quant_cpu_q32.c) */
#endif
