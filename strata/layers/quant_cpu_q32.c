/* GEMV and dequantization of llama.cpp's 32-weight blocks Q8_0, Q4_1, Q5_0 and Q5_1, read as GGUF stores them.
 *
 * Layouts (strata/quant/ggml_blocks.py): one row of blocks per output channel, each block 32 consecutive
 * inputs: q8_0 is 34 bytes, fp16 d then 32 int8 codes (w = d q); q4_1 is 20 bytes, fp16 d, fp16 m, then 16
 * bytes whose low nibbles are weights 0-15 and high nibbles weights 16-31 (w = d q + m); q5_0 (22 bytes: fp16 d,
 * 4 bytes qh, 16 bytes of nibbles as q4_1's, w = d (q - 16)) and q5_1 (24 bytes: fp16 d, fp16 m, qh, nibbles,
 * w = d q + m) add bit j of qh (a little-endian uint32) as bit 4 of weight j's code.
 *
 * Codes become bf16 numbers by OR-ing a 4-bit field into an exponent (exact), and vdpbf16ps multiplies them
 * with the bf16 activations; a per-block offset comes back through the block's sum of x (xs):
 *   q8_0 (one block per step): with u = q + 128 = 16 h + l, the high nibble h becomes 2048 + 16 h (0x4500) and
 *        the low one 128 + l (0x4300), both against the block's x: their products sum to dot(q + 2304, x).
 *   q4_1 (two blocks per step, 64 weights): the low nibbles of blocks j and j + 1 (weights 0-15 of each) and the
 *        high nibbles (16-31) become 128 + q, against x reordered once per call to match; lanes 0-7 of the
 *        products belong to block j, lanes 8-15 to block j + 1.
 *   q5_0, q5_1: as q4_1, with each code's fifth bit OR-ed in from qh under a lane mask (128 + q, q < 32).
 * So y = sum_j d_j P_j + c_j xs_j with c_j = -2304 d_j (q8_0), -144 d_j (q5_0) or m_j - 128 d_j (q4_1, q5_1); d
 * and c of each row are
 * read out of the blocks once per row into small arrays, so the vector loop only streams codes.
 *
 * gemv_qb_f32 takes fp32 activations and writes fp32: each x is split into two bf16 numbers, x = hi + lo to
 * 16 significant bits, and the codes meet both, so a float32 model computes within about 2^-16 of float32
 * arithmetic on the same weights instead of bf16's 2^-8 (logits of a GGUF model then match transformers'
 * float32 ones) at twice the dot products.
 */
#include "quant_cpu.h"

enum { QB8_0 = 0, QB4_1 = 1, QB5_0 = 2, QB5_1 = 3 }; /* the `kind` argument of the entry points */
static const int64_t QB_BYTES[4] = {34, 20, 22, 24};
#define QB_R 4 /* weight rows per block at one x row (2 when several x rows share the pass) */

/* weights per step of the vector loop, and x elements stored per step */
#define QB_STEP(kind) ((kind) == QB8_0 ? 32 : 64)
/* nibble kinds: two blocks per step, the 16 bytes of nibbles last in the block; q5 kinds: qh just before them */
#define QB_PAIRED(kind) ((kind) != QB8_0)
#define QB_HAS_QH(kind) ((kind) == QB5_0 || (kind) == QB5_1)
#define QB_HAS_MIN(kind) ((kind) == QB4_1 || (kind) == QB5_1)

static inline uint32_t qb_qh(const uint8_t *block, int64_t B) { /* a q5 block's qh, bit j for weight j */
    uint32_t h;
    memcpy(&h, block + B - 20, 4);
    return h;
}

/* the two code vectors of step s of one row (see the top of the file) */
static inline __attribute__((always_inline)) void qb_codes(int kind, const uint8_t *row, int64_t s, int64_t nb,
                                                           __m512i *a, __m512i *b) {
    const __m512i m4 = _mm512_set1_epi16(0x000F), e128 = _mm512_set1_epi16(0x4300);
    if (kind == QB8_0) {
        __m512i q = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(row + s * 34 + 2)));
        /* h = (q >> 4) ^ 8 (the sign bit flipped: u = q + 128), l = q & 15 */
        *a = _mm512_ternarylogic_epi32(_mm512_srli_epi16(q, 4), _mm512_set1_epi16(0x0008), _mm512_set1_epi16(0x4500),
                                       0xBE); /* (A ^ B) | C */
        *b = _mm512_ternarylogic_epi32(q, m4, e128, 0xEA); /* (A & B) | C */
        return;
    }
    const int64_t B = QB_BYTES[kind];
    const uint8_t *blk = row + 2 * s * B, *p = blk + B - 16;
    const int pair = 2 * s + 1 < nb;
    __m128i q0 = _mm_loadu_si128((const __m128i *)p);
    __m128i q1 = pair ? _mm_loadu_si128((const __m128i *)(p + B)) : _mm_setzero_si128();
    __m512i q = _mm512_cvtepu8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(q0), q1, 1));
    *a = _mm512_ternarylogic_epi32(q, m4, e128, 0xEA);
    *b = _mm512_or_si512(_mm512_srli_epi16(q, 4), e128);
    if (QB_HAS_QH(kind)) { /* lanes 0-15: block 2s, 16-31: 2s + 1; a: weights 0-15, b: 16-31; bit 4 is 0: + is OR */
        const __m512i b4 = _mm512_set1_epi16(0x0010);
        uint32_t h0 = qb_qh(blk, B), h1 = pair ? qb_qh(blk + B, B) : 0;
        *a = _mm512_mask_add_epi16(*a, (__mmask32)((h0 & 0xFFFFu) | (h1 << 16)), *a, b4);
        *b = _mm512_mask_add_epi16(*b, (__mmask32)((h0 >> 16) | (h1 & 0xFFFF0000u)), *b, b4);
    }
}

/* d of a row's blocks into ds, their offsets c into cs (both zero from nb up to nbp, a multiple of 16): one
 * gather of the blocks' first 4 bytes per 16 blocks (a scalar loop cost as much as the dot products) */
static inline __attribute__((always_inline)) void qb_factors(int kind, const uint8_t *row, int64_t nb, int64_t nbp,
                                                             float *ds, float *cs) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32((int)QB_BYTES[kind]));
    for (int64_t j = 0; j < nbp; j += 16) {
        __mmask16 mk = j < nb ? tail16(nb - j) : 0;
        __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mk, idx, row + j * QB_BYTES[kind], 1);
        __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g)); /* bytes 0-1 */
        __m512 c = QB_HAS_MIN(kind)
                       ? _mm512_sub_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16))),
                                       _mm512_mul_ps(_mm512_set1_ps(128.0f), d))
                       : _mm512_mul_ps(_mm512_set1_ps(kind == QB5_0 ? -144.0f : -2304.0f), d);
        _mm512_storeu_ps(ds + j, d);
        _mm512_storeu_ps(cs + j, c);
    }
}

/* out[r][m] = row r . x row m for R rows of ldw bytes (nb blocks, ns steps); xh (and xl when split) hold x in
 * step order, ldx elements per x row; ds / cs: lds floats per row (qb_factors); xs: block sums, lds per x row */
static inline __attribute__((always_inline)) void qb_rows(int kind, int split, int mb, int R, const uint8_t *w,
                                                          int64_t ldw, int64_t nb, int64_t ns, const uint16_t *xh,
                                                          const uint16_t *xl, int64_t ldx, const float *ds,
                                                          const float *cs, const float *xs, int64_t lds,
                                                          float out[][MB]) {
    const int64_t SB = QB_PAIRED(kind) ? 2 * QB_BYTES[kind] : QB_BYTES[kind]; /* bytes per step */
    __m512 tot[QB_R][MB];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) tot[r][m] = _mm512_setzero_ps();
    for (int64_t s = 0; s < ns; s++) {
        __m512i a[QB_R], b[QB_R];
        __m512 sc[QB_R];
        for (int r = 0; r < R; r++) {
            const uint8_t *row = w + r * ldw;
            /* the same bytes of the rows 4 blocks on (see PREFETCH in quant_cpu.h; 4 blocks streamed 1.4x faster
             * than the next block's rows, measured DRAM-bound on one Zen 5 core): steps are shorter than a line,
             * so one prefetch per step reaches every line, without the branches of a per-line loop */
            _mm_prefetch((const char *)(row + 4 * R * ldw + s * SB), _MM_HINT_T0);
            qb_codes(kind, row, s, nb, &a[r], &b[r]);
            const float *d = ds + r * lds;
            sc[r] = QB_PAIRED(kind) ? _mm512_mask_mov_ps(_mm512_set1_ps(d[2 * s]), 0xFF00, _mm512_set1_ps(d[2 * s + 1]))
                                  : _mm512_set1_ps(d[s]);
        }
        for (int m = 0; m < mb; m++) {
            const int64_t o = m * ldx + s * QB_STEP(kind);
            __m512bh xa = AS_BH(_mm512_loadu_si512(xh + o));
            __m512bh xb = QB_PAIRED(kind) ? AS_BH(_mm512_loadu_si512(xh + o + 32)) : xa;
            __m512bh la = xa, lb = xb;
            if (split) {
                la = AS_BH(_mm512_loadu_si512(xl + o));
                lb = QB_PAIRED(kind) ? AS_BH(_mm512_loadu_si512(xl + o + 32)) : la;
            }
            for (int r = 0; r < R; r++) {
                __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), AS_BH(a[r]), xa);
                p = _mm512_dpbf16_ps(p, AS_BH(b[r]), xb);
                if (split) {
                    p = _mm512_dpbf16_ps(p, AS_BH(a[r]), la);
                    p = _mm512_dpbf16_ps(p, AS_BH(b[r]), lb);
                }
                tot[r][m] = _mm512_fmadd_ps(p, sc[r], tot[r][m]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) {
            __m512 c = _mm512_setzero_ps();
            for (int64_t j = 0; j < lds; j += 16)
                c = _mm512_fmadd_ps(_mm512_loadu_ps(cs + r * lds + j), _mm512_loadu_ps(xs + m * lds + j), c);
            out[r][m] = _mm512_reduce_add_ps(_mm512_add_ps(tot[r][m], c));
        }
}

/* x element k of a row -> its place in step order (nibble kinds interleave the halves of two blocks) */
static inline int64_t qb_slot(int kind, int64_t k) {
    if (kind == QB8_0) return k;
    int64_t s = k / 64, j = (k / 32) & 1, e = k & 31; /* step, block in the step, weight in the block */
    return s * 64 + (e >> 4) * 32 + j * 16 + (e & 15);
}

/* one x row [32 nb] into step order (qb_slot) as bf16, hi in xh and (split: fp32 x = hi + lo) lo in xl, and each
 * block's sum of x (of hi + lo: the code offsets then cancel exactly) in xs; 16 values a vector */
static inline __attribute__((always_inline)) void qb_x_row(int kind, int split, const void *x, int64_t nb,
                                                           uint16_t *xh, uint16_t *xl, float *xs) {
    for (int64_t j = 0; j < nb; j++) {
        __m512 sum = _mm512_setzero_ps();
        for (int c = 0; c < 2; c++) { /* elements 16 c .. 16 c + 15 of block j */
            const int64_t k = 32 * j + 16 * c, o = qb_slot(kind, k);
            __m512 v;
            if (split) {
                const __m512 f = _mm512_loadu_ps((const float *)x + k);
                _mm256_storeu_si256((__m256i *)(xh + o), (__m256i)_mm512_cvtneps_pbh(f));
                const __m512 hi = bf16x16_load(xh + o, 0xFFFF);
                _mm256_storeu_si256((__m256i *)(xl + o), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(f, hi)));
                v = _mm512_add_ps(hi, bf16x16_load(xl + o, 0xFFFF));
            } else {
                const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + k));
                _mm256_storeu_si256((__m256i *)(xh + o), h);
                v = bf16x16_load(xh + o, 0xFFFF);
            }
            sum = _mm512_add_ps(sum, v);
        }
        xs[j] = _mm512_reduce_add_ps(sum);
    }
}

/* y = x W^T (+ bias); split: x fp32 [M, K] in, y fp32 out; else x bf16 in, y bf16 out */
static inline __attribute__((always_inline)) void qb_gemv(int kind, int split, const void *x_in, int64_t M,
                                                          int64_t K, const uint8_t *w, int64_t N, const float *bias,
                                                          void *y) {
    const int64_t nb = K / 32, ldw = nb * QB_BYTES[kind], ns = QB_PAIRED(kind) ? (nb + 1) / 2 : nb;
    const int64_t ldx = ns * QB_STEP(kind) + 32, lds = (nb + 2 + 15) / 16 * 16; /* +32: no 4K aliasing */
    uint16_t *xh = calloc((size_t)(2 * MB * ldx), sizeof(uint16_t)), *xl = xh + MB * ldx;
    float *xs = calloc((size_t)(MB * lds), sizeof(float));
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        int mb = M - m0 < MB ? (int)(M - m0) : MB;
        for (int m = 0; m < mb; m++)
            qb_x_row(kind, split, split ? (const void *)((const float *)x_in + (m0 + m) * K)
                                        : (const void *)((const uint16_t *)x_in + (m0 + m) * K),
                     nb, xh + m * ldx, xl + m * ldx, xs + m * lds);
        const int R = mb == 1 ? QB_R : 2;
        int64_t nblocks = (N + R - 1) / R;
#pragma omp parallel if (N * ldw * mb > PAR_MIN_WORK)
        {
            float *ds = malloc(sizeof(float) * (size_t)(2 * QB_R * lds)), *cs = ds + QB_R * lds;
#pragma omp for schedule(static)
            for (int64_t blk = 0; blk < nblocks; blk++) {
                int64_t n0 = blk * R;
                int rows = N - n0 < R ? (int)(N - n0) : R;
                const uint8_t *wr = w + n0 * ldw;
                float r[QB_R][MB];
                for (int i = 0; i < rows; i++) qb_factors(kind, wr + i * ldw, nb, lds, ds + i * lds, cs + i * lds);
                if (rows < R) {
                    for (int i = 0; i < rows; i++) {
                        float r1[1][MB];
#define ONE_ROW(MBC) \
    qb_rows(kind, split, MBC, 1, wr + i * ldw, ldw, nb, ns, xh, xl, ldx, ds + i * lds, cs + i * lds, xs, lds, r1)
                        SWITCH_MB(mb, ONE_ROW);
#undef ONE_ROW
                        for (int m = 0; m < mb; m++) r[i][m] = r1[0][m];
                    }
                } else {
#define BLOCK(MBC) qb_rows(kind, split, MBC, MBC == 1 ? QB_R : 2, wr, ldw, nb, ns, xh, xl, ldx, ds, cs, xs, lds, r)
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
            free(ds);
        }
    }
    free(xs);
    free(xh);
}

/* y [M, N] = x [M, K] @ W^T (+ bias) for w uint8 [N, K / 32 * B] in block type `kind`; K a multiple of 32 */
void gemv_qb(int64_t kind, const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
             const float *bias, uint16_t *y) {
#ifndef __AVX512F__
    qb_gemv_avx2((int)kind, 0, x, M, K, w, N, bias, y); /* the AVX2 build's own kernel (quant_cpu_q32_avx2.c) */
    return;
#endif
    if (M > 1 && (kind == QB4_1 || kind == QB8_0)) { /* the GEMM was faster from 2 rows (benchmarks/quant_gemm.py) */
        gemm_dq(WK_Q8_0 + kind, x, M, K, w, NULL, NULL, N, 0, bias, y);
        return;
    }
    switch (kind) { /* one compiled copy per kind */
    case QB4_1: qb_gemv(QB4_1, 0, x, M, K, w, N, bias, y); break;
    case QB5_0: qb_gemv(QB5_0, 0, x, M, K, w, N, bias, y); break;
    case QB5_1: qb_gemv(QB5_1, 0, x, M, K, w, N, bias, y); break;
    default: qb_gemv(QB8_0, 0, x, M, K, w, N, bias, y);
    }
}

/* gemv_qb for fp32 x [M, K] and fp32 y [M, N], at about 2^-16 of fp32 arithmetic (see the top of the file) */
void gemv_qb_f32(int64_t kind, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
                 const float *bias, float *y) {
#ifndef __AVX512F__
    qb_gemv_avx2((int)kind, 1, x, M, K, w, N, bias, y);
    return;
#endif
    switch (kind) {
    case QB4_1: qb_gemv(QB4_1, 1, x, M, K, w, N, bias, y); break;
    case QB5_0: qb_gemv(QB5_0, 1, x, M, K, w, N, bias, y); break;
    case QB5_1: qb_gemv(QB5_1, 1, x, M, K, w, N, bias, y); break;
    default: qb_gemv(QB8_0, 1, x, M, K, w, N, bias, y);
    }
}

/* rows [n0, n1) of a Q8_0 / Q4_1 / Q5_0 / Q5_1 weight, w = d q, d q + m or d (q - 16) in fp32 as gguf.quants
 * computes it; out bf16
 * (rounded once) or fp32 (exact) [n1 - n0, K] */
static inline __attribute__((always_inline)) void qb_dequant(int64_t kind, int f32, const uint8_t *w, int64_t K,
                                                             int64_t n0, int64_t n1, void *out) {
    const int64_t nb = K / 32, B = QB_BYTES[kind], ldw = nb * B;
    PAR_FOR((n1 - n0) * ldw > PAR_MIN_WORK, i, n1 - n0, {
        const int64_t n = n0 + i;
        for (int64_t j = 0; j < nb; j++) {
            const uint8_t *b = w + n * ldw + j * B;
            int64_t o = (n - n0) * K + j * 32;
            __m512 d = _mm512_set1_ps(half_at(b));
            for (int h = 0; h < 2; h++) { /* weights 16h .. 16h + 15 */
                __m512 v;
                if (kind != QB8_0) {
                    __m128i q = _mm_loadu_si128((const __m128i *)(b + B - 16));
                    q = _mm_and_si128(h ? _mm_srli_epi16(q, 4) : q, _mm_set1_epi8(0x0F));
                    __m512i qi = _mm512_cvtepu8_epi32(q);
                    if (kind != QB4_1)
                        qi = _mm512_mask_or_epi32(qi, (__mmask16)(qb_qh(b, B) >> (16 * h)), qi,
                                                  _mm512_set1_epi32(16));
                    if (kind == QB5_0)
                        v = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(qi, _mm512_set1_epi32(16))));
                    else
                        v = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(qi)), _mm512_set1_ps(half_at(b + 2)));
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
    });
}

/* qb_dequant's bf16 output for q4_1 through a table, half the instructions (the batched GEMM dequantizes every
 * weight once per call): per block the 16 values d q + m by the same expression, rounded once, then vpermw by
 * the codes (low nibbles are weights 0-15, high nibbles 16-31) */
static void q4_1_dequant_bf16(const uint8_t *w, int64_t K, int64_t n0, int64_t n1, uint16_t *out) {
    const int64_t nb = K / 32, ldw = nb * QB_BYTES[QB4_1];
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1); /* lanes 16-31: 4 */
    PAR_FOR((n1 - n0) * ldw > PAR_MIN_WORK, i, n1 - n0, {
        const uint8_t *row = w + (n0 + i) * ldw;
        uint16_t *o = out + i * K;
        for (int64_t j = 0; j < nb; j++) {
            const uint8_t *b = row + j * QB_BYTES[QB4_1];
            __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(half_at(b)), iota), _mm512_set1_ps(half_at(b + 2)));
            __m512i lut = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(v));
            __m512i q = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(b + 4))));
            q = _mm512_and_si512(_mm512_srlv_epi16(q, shift), _mm512_set1_epi16(0x0F));
            _mm512_storeu_si512(o + j * 32, _mm512_permutexvar_epi16(q, lut));
        }
    });
}

void dequant_qb(int64_t kind, const uint8_t *w, int64_t K, int64_t n0, int64_t n1, uint16_t *out) {
    if (kind == QB4_1)
        q4_1_dequant_bf16(w, K, n0, n1, out);
    else
        qb_dequant(kind, 0, w, K, n0, n1, out);
}

void dequant_qb_f32(int64_t kind, const uint8_t *w, int64_t K, int64_t n0, int64_t n1, float *out) {
    qb_dequant(kind, 1, w, K, n0, n1, out);
}
