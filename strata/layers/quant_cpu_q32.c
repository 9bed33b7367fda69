/* GEMV and bf16 dequantization of llama.cpp's 32-weight blocks Q8_0 and Q4_1, read as GGUF stores them.
 *
 * Layouts (strata/weights/ggml_blocks.py): one row of blocks per output channel, each block 32 consecutive
 * inputs: q8_0 is 34 bytes, fp16 d then 32 int8 codes (w = d q); q4_1 is 20 bytes, fp16 d, fp16 m, then 16
 * bytes whose low nibbles are weights 0-15 and high nibbles weights 16-31 (w = d q + m).
 *
 * The 32 codes of a block become 32 bf16 lanes and one vdpbf16ps against the block's 32 bf16 activations gives
 * 16 partial sums, scaled by d with one FMA. q8_0 codes convert exactly through fp32; q4_1 codes become the
 * bf16 number 128 + q by OR-ing 0x4300 into the nibble (exact: q < 16), and the 128 offset and the minimum come
 * back through the block's sum of x (xs): y = sum_b d_b dot(128 + q, x_b) + (m_b - 128 d_b) xs_b.
 *
 * gemv_qb_f32 takes fp32 activations and writes fp32: each x is split into two bf16 numbers, x = hi + lo to
 * 16 significant bits, and the codes (exact in bf16) meet both, so a float32 model computes within about 2^-16
 * of float32 arithmetic on the same weights instead of bf16's 2^-8 (logits of a GGUF model then match
 * transformers' float32 ones; one more vdpbf16ps per block).
 */
#include "quant_cpu.h"

enum { QB8_0 = 0, QB4_1 = 1 }; /* the `kind` argument of the entry points */
static const int64_t QB_BYTES[2] = {34, 20};
#define QB_R 4 /* weight rows per block at one x row (2 when several x rows share the pass) */

/* the 32 codes of block b as bf16 lanes in weight order: q8_0 q exactly, q4_1 128 + q */
static inline __attribute__((always_inline)) __m512bh qb_codes(int kind, const uint8_t *b) {
    if (kind == QB4_1) {
        /* the 16 bytes twice as u16 lanes; lanes 16-31 shifted right by 4 give the high nibbles */
        __m512i q = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(b + 4))));
        q = _mm512_srlv_epi16(q, _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1));
        return (__m512bh)_mm512_ternarylogic_epi32(q, _mm512_set1_epi16(0x000F), _mm512_set1_epi16(0x4300), 0xEA);
    }
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2))));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 18))));
    return _mm512_cvtne2ps_pbh(hi, lo); /* lanes 0-15 from lo: exact, |q| <= 128 */
}

/* out[r][m] = row r . x row m for R rows of ldw bytes (nb blocks); xs [mb][nb] block sums of x (q4_1); xl: the
 * low bf16 halves of x (split: x = x + xl), or unused */
static inline __attribute__((always_inline)) void qb_rows(int kind, int split, int mb, int R, const uint8_t *w,
                                                          int64_t ldw, int64_t nb, const uint16_t *x,
                                                          const uint16_t *xl, int64_t K, const float *xs,
                                                          float out[][MB]) {
    const int64_t B = QB_BYTES[kind];
    __m512 tot[QB_R][MB];
    float corr[QB_R][MB];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) {
            tot[r][m] = _mm512_setzero_ps();
            corr[r][m] = 0.0f;
        }
    for (int64_t j = 0; j < nb; j++) {
        __m512bh q[QB_R];
        __m512 d[QB_R];
        for (int r = 0; r < R; r++) {
            const uint8_t *b = w + r * ldw + j * B;
            /* the same bytes of the next block's rows (see PREFETCH in quant_cpu.h), each line once */
            uintptr_t pf = (uintptr_t)(b + R * ldw), end = pf + (uintptr_t)B;
            for (uintptr_t line = j == 0 ? pf & ~(uintptr_t)63 : (pf + 63) & ~(uintptr_t)63; line < end; line += 64)
                _mm_prefetch((const char *)line, _MM_HINT_T0);
            float dr = half_at(b);
            d[r] = _mm512_set1_ps(dr);
            q[r] = qb_codes(kind, b);
            if (kind == QB4_1) {
                float c = half_at(b + 2) - 128.0f * dr;
                for (int m = 0; m < mb; m++) corr[r][m] += c * xs[m * nb + j];
            }
        }
        for (int m = 0; m < mb; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + j * 32);
            __m512bh xlv = split ? (__m512bh)_mm512_loadu_si512(xl + m * K + j * 32) : xv;
            for (int r = 0; r < R; r++) {
                __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), q[r], xv);
                if (split) p = _mm512_dpbf16_ps(p, q[r], xlv);
                tot[r][m] = _mm512_fmadd_ps(p, d[r], tot[r][m]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) out[r][m] = _mm512_reduce_add_ps(tot[r][m]) + corr[r][m];
}

/* y = x W^T (+ bias); split: x32 fp32 [M, K] in, y fp32 out; else x bf16 in, y bf16 out */
static inline __attribute__((always_inline)) void qb_gemv(int kind, int split, const void *x_in, int64_t M,
                                                          int64_t K, const uint8_t *w, int64_t N, const float *bias,
                                                          void *y) {
    const int64_t nb = K / 32, ldw = nb * QB_BYTES[kind];
    float *xs = malloc(sizeof(float) * (size_t)(MB * nb));
    uint16_t *xsplit = split ? malloc(sizeof(uint16_t) * (size_t)(2 * MB * K)) : NULL;
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        int mb = M - m0 < MB ? (int)(M - m0) : MB;
        const uint16_t *xm = split ? xsplit : (const uint16_t *)x_in + m0 * K, *xl = xsplit + MB * K;
        if (split) /* hi = bf16(x), lo = bf16(x - hi) */
            for (int m = 0; m < mb; m++)
                for (int64_t k = 0; k < K; k += 16) {
                    __m512 v = _mm512_loadu_ps((const float *)x_in + (m0 + m) * K + k);
                    __m256bh h = _mm512_cvtneps_pbh(v);
                    __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
                    _mm256_storeu_si256((__m256i *)(xsplit + m * K + k), (__m256i)h);
                    _mm256_storeu_si256((__m256i *)(xsplit + MB * K + m * K + k),
                                        (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, hf)));
                }
        if (kind == QB4_1)
            for (int m = 0; m < mb; m++)
                for (int64_t j = 0; j < nb; j++) {
                    __m512 lo, hi;
                    if (split) {
                        lo = _mm512_loadu_ps((const float *)x_in + (m0 + m) * K + j * 32);
                        hi = _mm512_loadu_ps((const float *)x_in + (m0 + m) * K + j * 32 + 16);
                    } else {
                        lo = bf16x16_load(xm + m * K + j * 32, 0xFFFF);
                        hi = bf16x16_load(xm + m * K + j * 32 + 16, 0xFFFF);
                    }
                    xs[m * nb + j] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
                }
        const int R = mb == 1 ? QB_R : 2;
        int64_t nblocks = (N + R - 1) / R;
#pragma omp parallel for schedule(static) if (N * ldw * mb > PAR_MIN_WORK)
        for (int64_t blk = 0; blk < nblocks; blk++) {
            int64_t n0 = blk * R;
            int rows = N - n0 < R ? (int)(N - n0) : R;
            const uint8_t *wr = w + n0 * ldw;
            float r[QB_R][MB];
            if (rows < R) {
                for (int i = 0; i < rows; i++) {
                    float r1[1][MB];
#define ONE_ROW(MBC) qb_rows(kind, split, MBC, 1, wr + i * ldw, ldw, nb, xm, xl, K, xs, r1)
                    SWITCH_MB(mb, ONE_ROW);
#undef ONE_ROW
                    for (int m = 0; m < mb; m++) r[i][m] = r1[0][m];
                }
            } else {
#define BLOCK(MBC) qb_rows(kind, split, MBC, MBC == 1 ? QB_R : 2, wr, ldw, nb, xm, xl, K, xs, r)
                SWITCH_MB(mb, BLOCK);
#undef BLOCK
            }
            for (int i = 0; i < rows; i++)
                for (int m = 0; m < mb; m++) {
                    if (split)
                        ((float *)y)[(m0 + m) * N + n0 + i] = bias ? r[i][m] + bias[n0 + i] : r[i][m];
                    else
                        store_out((uint16_t *)y + m0 * N, N, m, n0 + i, r[i][m], bias);
                }
        }
    }
    free(xs);
    free(xsplit);
}

/* y [M, N] = x [M, K] @ W^T (+ bias) for w uint8 [N, K / 32 * B] in block type `kind`; K a multiple of 32 */
void gemv_qb(int64_t kind, const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
             const float *bias, uint16_t *y) {
    if (kind == QB4_1)
        qb_gemv(QB4_1, 0, x, M, K, w, N, bias, y);
    else
        qb_gemv(QB8_0, 0, x, M, K, w, N, bias, y);
}

/* gemv_qb for fp32 x [M, K] and fp32 y [M, N], at about 2^-16 of fp32 arithmetic (see the top of the file) */
void gemv_qb_f32(int64_t kind, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
                 const float *bias, float *y) {
    if (kind == QB4_1)
        qb_gemv(QB4_1, 1, x, M, K, w, N, bias, y);
    else
        qb_gemv(QB8_0, 1, x, M, K, w, N, bias, y);
}

/* rows [n0, n1) of a Q8_0 / Q4_1 weight, w = d q or d q + m in fp32 as gguf.quants computes it; out bf16
 * (rounded once) or fp32 (exact) [n1 - n0, K] */
static inline __attribute__((always_inline)) void qb_dequant(int64_t kind, int f32, const uint8_t *w, int64_t K,
                                                             int64_t n0, int64_t n1, void *out) {
    const int64_t nb = K / 32, B = QB_BYTES[kind], ldw = nb * B;
#pragma omp parallel for schedule(static) if ((n1 - n0) * ldw > PAR_MIN_WORK)
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t j = 0; j < nb; j++) {
            const uint8_t *b = w + n * ldw + j * B;
            int64_t o = (n - n0) * K + j * 32;
            __m512 d = _mm512_set1_ps(half_at(b));
            for (int h = 0; h < 2; h++) { /* weights 16h .. 16h + 15 */
                __m512 v;
                if (kind == QB4_1) {
                    __m128i q = _mm_loadu_si128((const __m128i *)(b + 4));
                    q = _mm_and_si128(h ? _mm_srli_epi16(q, 4) : q, _mm_set1_epi8(0x0F));
                    v = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q))),
                                      _mm512_set1_ps(half_at(b + 2)));
                } else {
                    __m128i q = _mm_loadu_si128((const __m128i *)(b + 2 + 16 * h));
                    v = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)));
                }
                if (f32)
                    _mm512_storeu_ps((float *)out + o + 16 * h, v);
                else
                    _mm256_storeu_si256((__m256i *)((uint16_t *)out + o + 16 * h), (__m256i)_mm512_cvtneps_pbh(v));
            }
        }
    }
}

void dequant_qb(int64_t kind, const uint8_t *w, int64_t K, int64_t n0, int64_t n1, uint16_t *out) {
    qb_dequant(kind, 0, w, K, n0, n1, out);
}

void dequant_qb_f32(int64_t kind, const uint8_t *w, int64_t K, int64_t n0, int64_t n1, float *out) {
    qb_dequant(kind, 1, w, K, n0, n1, out);
}
