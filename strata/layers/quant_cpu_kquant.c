/* GEMV and bf16 dequantization of llama.cpp's K-quant blocks (q4_k, q5_k, q6_k), read as GGUF stores them.
 *
 * Layouts: strata/quant/kquant.py. Each 256-weight super-block is 8 sub-blocks of 32 weights; a sub-block's
 * codes (4, 5 or 6 bits) go into 16-bit lanes and become the bf16 number 128 + q by OR-ing in 0x4300 (exact:
 * q < 128), so the dot products run on vdpbf16ps straight against the bf16 activations (32 consecutive
 * weights against 32 consecutive x). The 16 fp32 lanes of one product cover weights 2i and 2i + 1 in lane i,
 * so lanes 0-7 are the sub-block's first 16 weights and lanes 8-15 the other 16 (q6_k's two scales).
 *
 * Per super-block, one vector of 16 factors (kq_factors) scales every product and, dotted with precomputed
 * sums of x (xc), removes the 128 offset, the mins (q4_k/q5_k: w = d sc q - dmin m) and q6_k's 32 offset
 * (w = d sc (q - 32)): y = sum_j f_j dot(128 + q, x)_j - sum f . xc.
 */
#include "quant_cpu.h"

enum { KQ4 = 0, KQ5 = 1, KQ6 = 2 }; /* the `kind` argument of the entry points */
static const int64_t KQ_BYTES[3] = {144, 176, 210};
#define KQ_R 4 /* weight rows per block at one x row (2 when several x rows share the pass) */

/* q4_k/q5_k: lanes 0-7 = d * sc[j], lanes 8-15 = dmin * m[j]; q6_k: lane g = d * sc[g] (16-weight groups) */
static inline __attribute__((always_inline)) __m512 kq_factors(int kind, const uint8_t *b) {
    if (kind == KQ6) {
        __m512 s = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 192))));
        return _mm512_mul_ps(s, _mm512_set1_ps(half_at(b + 208)));
    }
    /* 12 bytes as 32-bit words u0 u1 u2: sc[0..3] = u0 & 63, m[0..3] = u1 & 63, sc[4..7] = (u2 & 15) | top two
     * bits of u0's bytes, m[4..7] = (u2 >> 4) | top two bits of u1's; four lanes at once, in the order
     * sc[0..3], sc[4..7], m[0..3], m[4..7] (vector ops: a scalar decode cost as much as the dot products) */
    __m128i u = _mm_loadu_si128((const __m128i *)(b + 4)); /* bytes 12-15 are codes, unused */
    __m128i lo = _mm_srlv_epi32(_mm_shuffle_epi32(u, _MM_SHUFFLE(2, 1, 2, 0)), _mm_set_epi32(4, 0, 0, 0));
    lo = _mm_and_si128(lo, _mm_set_epi32(0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f));
    __m128i hi = _mm_srli_epi32(_mm_shuffle_epi32(u, _MM_SHUFFLE(1, 1, 0, 0)), 2);
    __m128i v = _mm_or_si128(lo, _mm_and_si128(hi, _mm_set_epi32(0x30303030, 0, 0x30303030, 0)));
    __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
    return _mm512_mul_ps(f, _mm512_mask_mov_ps(_mm512_set1_ps(half_at(b)), 0xFF00, _mm512_set1_ps(half_at(b + 2))));
}

/* Chunk c (0..3) of super-block b: the codes of two sub-blocks that share their bytes, OR magic, as 32 u16
 * lanes each; *ja / *jb get their sub-block numbers (0..7). */
static inline __attribute__((always_inline)) void kq_chunk(int kind, const uint8_t *b, int c, __m512i magic,
                                                           __m512i *a, __m512i *bv, int *ja, int *jb) {
    const __m512i m4 = _mm512_set1_epi16(0x000F);
    if (kind == KQ6) {
        int half = c >> 1, t = c & 1;
        __m512i q = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(b + 64 * half + 32 * t)));
        __m512i h = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(b + 128 + 32 * half)));
        __m512i m2 = _mm512_set1_epi16(0x0030);
        __m512i ha = _mm512_and_si512(_mm512_srl_epi16(_mm512_slli_epi16(h, 4), _mm_cvtsi32_si128(2 * t)), m2);
        __m512i hb = _mm512_and_si512(_mm512_srl_epi16(h, _mm_cvtsi32_si128(2 * t)), m2);
        *a = _mm512_or_si512(_mm512_ternarylogic_epi32(q, m4, magic, 0xEA), ha); /* (q & 15) | magic | ha */
        *bv = _mm512_ternarylogic_epi32(_mm512_srli_epi16(q, 4), hb, magic, 0xFE);
        *ja = 4 * half + t;
        *jb = *ja + 2;
        return;
    }
    const uint8_t *qs = b + (kind == KQ5 ? 48 : 16) + 32 * c;
    __m512i q = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)qs));
    *a = _mm512_ternarylogic_epi32(q, m4, magic, 0xEA);
    *bv = _mm512_or_si512(_mm512_srli_epi16(q, 4), magic);
    if (kind == KQ5) { /* fifth bit of sub-block j: bit j of the byte at the same position */
        __m512i h = _mm512_srl_epi16(_mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(b + 16))),
                                     _mm_cvtsi32_si128(2 * c));
        const __m512i b4 = _mm512_set1_epi16(0x0010);
        *a = _mm512_ternarylogic_epi32(*a, _mm512_slli_epi16(h, 4), b4, 0xF8); /* A | (B & C) */
        *bv = _mm512_ternarylogic_epi32(*bv, _mm512_slli_epi16(h, 3), b4, 0xF8);
    }
    *ja = 2 * c;
    *jb = 2 * c + 1;
}

/* the factor of sub-block j for each of the 16 product lanes; fs: f stored to memory, so that q4_k/q5_k
 * broadcast from it (a load) instead of permuting (a shuffle, the port the code widening also needs) */
static inline __attribute__((always_inline)) __m512 kq_lane_factor(int kind, __m512 f, const float *fs, int j) {
    if (kind != KQ6)
        return _mm512_set1_ps(fs[j]);
    __m512i idx = _mm512_mask_mov_epi32(_mm512_set1_epi32(2 * j), 0xFF00, _mm512_set1_epi32(2 * j + 1));
    return _mm512_permutexvar_ps(idx, f);
}

/* out[r][m] = row r . x row m for R rows of ldw bytes (nsb super-blocks); xc [mb][nsb * 16] */
static inline __attribute__((always_inline)) void kq_rows(int kind, int mb, int R, const uint8_t *w, int64_t ldw,
                                                          int64_t nsb, const uint16_t *x, int64_t K,
                                                          const float *xc, float out[][MB]) {
    const int64_t B = KQ_BYTES[kind];
    const __m512i magic = _mm512_set1_epi16(0x4300);
    __m512 tot[KQ_R][MB];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) tot[r][m] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        __m512 f[KQ_R];
        float fs[KQ_R][16];
        for (int r = 0; r < R; r++) {
            const uint8_t *b = w + r * ldw + sb * B;
            /* the same bytes of the next block's rows (see PREFETCH in quant_cpu.h), each line once */
            uintptr_t pf = (uintptr_t)(b + R * ldw), end = pf + (uintptr_t)B;
            for (uintptr_t line = sb == 0 ? pf & ~(uintptr_t)63 : (pf + 63) & ~(uintptr_t)63; line < end; line += 64)
                _mm_prefetch((const char *)line, _MM_HINT_T0);
            f[r] = kq_factors(kind, b);
            _mm512_storeu_ps(fs[r], f[r]);
            for (int m = 0; m < mb; m++)
                tot[r][m] = _mm512_fnmadd_ps(f[r], _mm512_loadu_ps(xc + m * nsb * 16 + sb * 16), tot[r][m]);
        }
        for (int c = 0; c < 4; c++) {
            __m512i qa[KQ_R], qb[KQ_R];
            int ja = 0, jb = 0;
            for (int r = 0; r < R; r++) kq_chunk(kind, w + r * ldw + sb * B, c, magic, &qa[r], &qb[r], &ja, &jb);
            for (int m = 0; m < mb; m++) {
                const uint16_t *xr = x + m * K + sb * 256;
                __m512bh xa = AS_BH(_mm512_loadu_si512(xr + 32 * ja));
                __m512bh xb = AS_BH(_mm512_loadu_si512(xr + 32 * jb));
                for (int r = 0; r < R; r++) {
                    __m512 pa = _mm512_dpbf16_ps(_mm512_setzero_ps(), AS_BH(qa[r]), xa);
                    __m512 pb = _mm512_dpbf16_ps(_mm512_setzero_ps(), AS_BH(qb[r]), xb);
                    tot[r][m] = _mm512_fmadd_ps(pa, kq_lane_factor(kind, f[r], fs[r], ja), tot[r][m]);
                    tot[r][m] = _mm512_fmadd_ps(pb, kq_lane_factor(kind, f[r], fs[r], jb), tot[r][m]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) out[r][m] = _mm512_reduce_add_ps(tot[r][m]);
}

/* xc[sb * 16 + l] for one bf16 x row: q4_k/q5_k 128 * (sum of sub-block l) for l < 8, the plain sum for
 * l - 8; q6_k 160 * (sum of 16-weight group l) */
static void kq_xsums(int kind, const uint16_t *x, int64_t nsb, float *xc) {
    for (int64_t sb = 0; sb < nsb; sb++) {
        float s16[16];
        for (int g = 0; g < 16; g++) {
            float s = 0;
            for (int i = 0; i < 16; i++) s += bf16_to_f32(x[sb * 256 + g * 16 + i]);
            s16[g] = s;
        }
        float *o = xc + sb * 16;
        for (int g = 0; g < 16; g++) {
            if (kind == KQ6) {
                o[g] = 160.0f * s16[g];
            } else {
                float s = s16[2 * (g & 7)] + s16[2 * (g & 7) + 1];
                o[g] = g < 8 ? 128.0f * s : s;
            }
        }
    }
}

static inline __attribute__((always_inline)) void kq_gemv(int kind, const uint16_t *x, int64_t M, int64_t K,
                                                          const uint8_t *w, int64_t N, const float *bias,
                                                          uint16_t *y) {
    const int64_t nsb = K / 256, ldw = nsb * KQ_BYTES[kind];
    float *xc = malloc(sizeof(float) * (size_t)(MB * nsb * 16));
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        int mb = M - m0 < MB ? (int)(M - m0) : MB;
        const uint16_t *xm = x + m0 * K;
        for (int m = 0; m < mb; m++) kq_xsums(kind, xm + m * K, nsb, xc + m * nsb * 16);
        const int R = mb == 1 ? KQ_R : 2;
        int64_t nblocks = (N + R - 1) / R;
#pragma omp parallel for schedule(static) if (N * ldw * mb > PAR_MIN_WORK)
        for (int64_t blk = 0; blk < nblocks; blk++) {
            int64_t n0 = blk * R;
            int rows = N - n0 < R ? (int)(N - n0) : R;
            const uint8_t *wr = w + n0 * ldw;
            float r[KQ_R][MB];
            if (rows < R) {
                for (int i = 0; i < rows; i++) {
                    float r1[1][MB];
#define ONE_ROW(MBC) kq_rows(kind, MBC, 1, wr + i * ldw, ldw, nsb, xm, K, xc, r1)
                    SWITCH_MB(mb, ONE_ROW);
#undef ONE_ROW
                    for (int m = 0; m < mb; m++) r[i][m] = r1[0][m];
                }
            } else {
#define BLOCK(MBC) kq_rows(kind, MBC, MBC == 1 ? KQ_R : 2, wr, ldw, nsb, xm, K, xc, r)
                SWITCH_MB(mb, BLOCK);
#undef BLOCK
            }
            for (int i = 0; i < rows; i++)
                for (int m = 0; m < mb; m++) store_out(y + m0 * N, N, m, n0 + i, r[i][m], bias);
        }
    }
    free(xc);
}

/* y [M, N] = x [M, K] @ W^T (+ bias) for w uint8 [N, K / 256 * B] in K-quant `kind`; K a multiple of 256 */
void gemv_kq(int64_t kind, const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
             const float *bias, uint16_t *y) {
#ifndef __AVX512F__
    /* the AVX2 build's own kernel (quant_cpu_q32x16_avx2.c): 1.3-2x this one from 4 rows, 1.2-1.6x at one */
    kq_gemv_x16_avx2((int)kind, x, M, K, w, N, bias, y);
#else
    switch (kind) {
    case KQ4: kq_gemv(KQ4, x, M, K, w, N, bias, y); break;
    case KQ5: kq_gemv(KQ5, x, M, K, w, N, bias, y); break;
    default: kq_gemv(KQ6, x, M, K, w, N, bias, y); break;
    }
#endif
}

static inline __attribute__((always_inline)) void kq_dequant(int kind, const uint8_t *w, int64_t K, int64_t n0,
                                                             int64_t n1, uint16_t *out) {
    const int64_t nsb = K / 256, ldw = nsb * KQ_BYTES[kind];
    PAR_FOR((n1 - n0) * ldw > PAR_MIN_WORK, i, n1 - n0, {
        const int64_t n = n0 + i;
        for (int64_t sb = 0; sb < nsb; sb++) {
            const uint8_t *b = w + n * ldw + sb * KQ_BYTES[kind];
            uint16_t *o = out + (n - n0) * K + sb * 256;
            float f[16]; /* lanes of kq_factors, read one at a time */
            _mm512_storeu_ps(f, kq_factors(kind, b));
            for (int c = 0; c < 4; c++) {
                __m512i q[2];
                int j[2];
                kq_chunk(kind, b, c, _mm512_setzero_si512(), &q[0], &q[1], &j[0], &j[1]);
                for (int s = 0; s < 2; s++) {
                    for (int h = 0; h < 2; h++) { /* weights 16h .. 16h + 15 of sub-block j[s] */
                        __m256i q16 = h ? _mm512_extracti64x4_epi64(q[s], 1) : _mm512_castsi512_si256(q[s]);
                        __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(q16));
                        if (kind == KQ6)
                            v = _mm512_mul_ps(_mm512_set1_ps(f[2 * j[s] + h]), _mm512_sub_ps(v, _mm512_set1_ps(32.0f)));
                        else
                            v = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(f[j[s]]), v), _mm512_set1_ps(f[8 + j[s]]));
                        _mm256_storeu_si256((__m256i *)(o + 32 * j[s] + 16 * h), (__m256i)_mm512_cvtneps_pbh(v));
                    }
                }
            }
        }
    });
}

/* rows [n0, n1) of a K-quant weight -> out [n1 - n0, K] bf16 */
void dequant_kq(int64_t kind, const uint8_t *w, int64_t K, int64_t n0, int64_t n1, uint16_t *out) {
    switch (kind) {
    case KQ4: kq_dequant(KQ4, w, K, n0, n1, out); break;
    case KQ5: kq_dequant(KQ5, w, K, n0, n1, out); break;
    default: kq_dequant(KQ6, w, K, n0, n1, out); break;
    }
}
