/* The bf16 GEMV of integer-coded weights for the AVX2 build, on int16 activations: GGUF's Q8_0, Q4_1, Q5_0 and
 * Q5_1 blocks and K-quants (Q4_K, Q5_K, Q6_K: blocks are their 32-weight sub-blocks, whose scale d * sc and
 * offset -dmin * min come from the super-block; Q6_K's codes - 32 meet x as two halves of 16, each summed apart
 * and multiplied by d * its scale in fp32),
 * Strata's int4 with groups of a multiple of 32 and int8 with rows of a multiple of 32 values.
 *
 * Widening every code to fp32 (quant_cpu_q32_avx2.c) costs about as many instructions per block as the dot
 * product itself. Here each activation row is quantized once per call in runs of 256 values (QX_SB blocks):
 * dx = max|x| / 32767 and xq = round(x / dx), 16 bits, an error of at most 2^-16 of the run's largest value
 * (bf16 itself rounds each value by up to 2^-9). A block's 32 codes then only widen to 16 bits (Q4_1: three
 * instructions, in their natural order: byte i holds weight i in its low nibble and i + 16 in its high one; int4
 * holds weights 2i and 2i + 1, and x is stored to match), two vpmaddwd give its 32 products as 8 int32 sums, and
 * one conversion and one FMA by the block's scale accumulate them; one FMA by dx per run applies the activation
 * scale. The offsets (m of q4_1 and q5_1, -16 d of q5_0, -zero * scale of int4) meet dx * sum(xq) of each block in
 * a dot product over the row's blocks at the end. Weights are exact (the AVX-512 kernels round int4 and int8
 * weights to bf16).
 *
 * A single x row runs against four weight rows at a time (more loads in flight), two or three against two, 4-6 rows
 * one weight row against QXM x rows held in registers; every x row of a call is quantized up front and stays in
 * L1/L2 (16 rows of K = 1536 are 48 KiB). From QX_MANY_MIN_ROWS x rows on (batched decode, MoE experts' token
 * groups, prompts below the float32-tile thresholds) one weight row meets QXG = 8 x rows at a time (qx_row_many):
 * its block scales are read once per row for all groups, x is stored in groups of 8 rows block-interleaved (one
 * pointer, constant offsets: 8 row pointers had spilled), and each run's 8 sums become one vector of 8 x rows by
 * a transpose tree (s5_sum8), scaled by the 8 rows' dx with one FMA; the offsets likewise, as 4 FMA chains over
 * the blocks (one chain, latency-bound, cost a quarter of the time at K = 576). 1.17-1.35x the QXM kernel at 8-16
 * rows with weights from memory (benchmarks/quant_gemm.py), 0.8-0.85x at 4-5 rows, where that one stays.
 *
 * On one Zen 3 core: 1.4x the fp32 kernel at one row of q4_1 (1.06x for SmolLM2's q8_0 LM head), 1.1-1.9x at 4-32
 * rows before the many-row kernel; int4 and int8 1.5-2.2x the translated AVX-512 kernels at one row, 2-4.4x at 4-8;
 * K-quants 1.3-2.1x at 4-32 rows, 1.2-1.6x at one (benchmarks/quant_gemm.py's shapes).
 *
 * Per run of 8 blocks: K-quants' scales and mins come once per super-block (qx_k4_factors, qx_k6_factors), int4's
 * with groups of 32 at 1-2 x rows 8 at a time (qx_int4_factors), into small arrays each block reads back with one
 * broadcast; these runs are unrolled, so K-quant sub-blocks shift by immediates (int4 at one row 1.2x, q6_k 1.1x).
 * K-quants prefetch an eighth of a super-block per sub-block: prefetching its first line only left 2 of every 3
 * lines of a 210-byte q6_k super-block to the hardware prefetcher, which at one row halved the speed from memory
 * (a 50304 x 2048 q6_k LM head: 19 ms, now 10.6).
 */
#include "quant_cpu.h"

#ifndef __AVX512F__

/* quant_cpu_q32.c's kinds, Strata's int4 and int8, then GGUF's K-quants (quant_cpu_kquant.c's order) */
enum { QX8_0 = 0, QX4_1 = 1, QX5_0 = 2, QX5_1 = 3, QX_INT4 = 4, QX_INT8 = 5, QX_Q4K = 6, QX_Q5K = 7, QX_Q6K = 8 };
static const int64_t QX_BYTES[6] = {34, 20, 22, 24, 16, 32}; /* per block of 32 weights */
static const int64_t QX_SUPER[3] = {144, 176, 210};          /* K-quants: per super-block of 256 */

static inline int64_t qx_row_bytes(int kind, int64_t K) {
    return kind >= QX_Q4K ? K / 256 * QX_SUPER[kind - QX_Q4K] : K / 32 * QX_BYTES[kind];
}

/* q4_k / q5_k: d * scale of the super-block at b's 8 sub-blocks into f, -dmin * min into o. The 12 packed bytes
 * as three words A, B, C (bytes 0-3, 4-7, 8-11): scales 0-3 are A's bytes & 63, 4-7 C's low nibbles with A's top
 * two bits above them; mins likewise from B and C's high nibbles */
static inline __attribute__((always_inline)) void qx_k4_factors(const uint8_t *b, float *f, float *o) {
    uint32_t A, B, C;
    memcpy(&A, b + 4, 4);
    memcpy(&B, b + 8, 4);
    memcpy(&C, b + 12, 4);
    const uint64_t sc = (uint64_t)(A & 0x3F3F3F3Fu) | (uint64_t)((C & 0x0F0F0F0Fu) | ((A >> 2) & 0x30303030u)) << 32;
    const uint64_t mn = (uint64_t)(B & 0x3F3F3F3Fu) | (uint64_t)(((C >> 4) & 0x0F0F0F0Fu) | ((B >> 2) & 0x30303030u)) << 32;
    const __m256 s8 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sc)));
    const __m256 m8 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mn)));
    _mm256_storeu_ps(f, _mm256_mul_ps(_mm256_set1_ps(half_at(b)), s8));
    _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_set1_ps(-half_at(b + 2)), m8));
}

/* q6_k: d times each of the super-block at b's 16 int8 scales (one per 16 weights) into f */
static inline __attribute__((always_inline)) void qx_k6_factors(const uint8_t *b, float *f) {
    const __m128i sc = _mm_loadu_si128((const __m128i *)(b + 192));
    const __m256 d = _mm256_set1_ps(half_at(b + 208));
    _mm256_storeu_ps(f, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc))));
    _mm256_storeu_ps(f + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(sc, sc)))));
}

/* int4: the scales of blocks [j0, j1) of weight row 0 of g into f[0..], their offsets -zero * scale into o[0..]
 * (groups of 32 over a whole run: 8 at once) */
static inline __attribute__((always_inline)) void qx_int4_factors(const uint16_t *s, const uint8_t *z, int gsh,
                                                                  int64_t j0, int64_t j1, float *f, float *o) {
    if (gsh == 5 && j1 - j0 == 8) {
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + j0)));
        const __m256 zf = z ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(z + j0))))
                            : _mm256_set1_ps(8.0f);
        _mm256_storeu_ps(f, d);
        _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_xor_ps(zf, _mm256_set1_ps(-0.0f)), d));
        return;
    }
    for (int64_t j = j0; j < j1; j++) {
        const int64_t gi = (32 * j) >> gsh;
        const float d = f16_to_f32(s[gi]);
        f[j - j0] = d;
        o[j - j0] = -(z ? (float)z[gi] : 8.0f) * d;
    }
}

/* the scales of Strata's formats (quant_cpu.h's layouts), from the first weight row of a call on. int4: fp16 scales
 * s [N, ng] and uint8 zero points z [N, ng] (NULL: 8), G = 1 << gsh a multiple of 32; int8: fp32 row scales rs [N] */
typedef struct {
    const uint16_t *s;
    const uint8_t *z;
    int64_t ng;
    int gsh;
    const float *rs;
} qx_groups;

static inline __attribute__((always_inline)) qx_groups qx_rows_from(qx_groups g, int64_t n) {
    g.s += n * g.ng;
    if (g.z) g.z += n * g.ng;
    if (g.rs) g.rs += n;
    return g;
}
#define QXM 4 /* activation rows per register block */
#define QX_SB 8 /* blocks of 32 per activation scale */

/* bf16 x [M, K] -> xq [M, K] int16, dx [M, nsb] (the scale of each run of QX_SB blocks), xs [M, nb] (dx times the
 * sum of each block's codes) */
static void qx_quantize(const uint16_t *x, int64_t M, int64_t K, int16_t *xq, float *dx, float *xs) {
    const int64_t nb = K / 32, nsb = (nb + QX_SB - 1) / QX_SB;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t m = 0; m < M; m++)
        for (int64_t sb = 0; sb < nsb; sb++) {
            const int64_t j0 = sb * QX_SB, j1 = j0 + QX_SB < nb ? j0 + QX_SB : nb;
            __m256 a = _mm256_setzero_ps();
            for (int64_t k = 32 * j0; k < 32 * j1; k += 8)
                a = _mm256_max_ps(a, _mm256_andnot_ps(sign, _mm256_castsi256_ps(_mm256_slli_epi32(
                                         _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(x + m * K + k))), 16))));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
            const float d = amax / 32767.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
            dx[m * nsb + sb] = d;
            for (int64_t j = j0; j < j1; j++) {
                const uint16_t *p = x + m * K + 32 * j;
                __m256i q[4]; /* round to nearest even (the default rounding mode) */
                for (int i = 0; i < 4; i++) {
                    __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(
                        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + 8 * i))), 16));
                    q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v, _mm256_set1_ps(id)));
                }
                /* packs works per 128-bit lane: [q0 lo, q1 lo, q0 hi, q1 hi] -> natural order by a 64-bit permute */
                __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
                __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8);
                _mm256_storeu_si256((__m256i *)(xq + m * K + 32 * j), lo);
                _mm256_storeu_si256((__m256i *)(xq + m * K + 32 * j + 16), hi);
                __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
                __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
                t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
                xs[m * nb + j] = d * (float)_mm_cvtsi128_si32(t);
            }
        }
}

/* bit i of the 16 bits h -> 16 in int16 lane i (the fifth bit of q5 codes) */
static inline __m256i qx_bit4(uint32_t h) {
    const __m256i lanes = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                            (short)0x8000);
    __m256i b = _mm256_and_si256(_mm256_set1_epi16((short)h), lanes);
    return _mm256_and_si256(_mm256_cmpeq_epi16(b, lanes), _mm256_set1_epi16(16));
}

/* block j of a row: its 32 codes as int16, weights 0-15 in lo and 16-31 in hi (int4: even weights in lo, odd ones
 * in hi); its scale, dd, and its offset per unit of x, o */
static inline __attribute__((always_inline)) void qx_codes(int kind, const uint8_t *row, __m256i *lo, __m256i *hi,
                                                           float *dd, float *o, qx_groups g, int64_t j, int pre) {
    if (kind >= QX_Q4K) { /* sub-block j % 8 of super-block j / 8 */
        const uint8_t *b = row + (j >> 3) * QX_SUPER[kind - QX_Q4K];
        const int sub = (int)(j & 7);
        if (kind == QX_Q6K) { /* ql, qh, 16 int8 scales (one per 16 weights), d: (q - 32) * scale as int16 */
            const int h = sub >> 2, t = sub & 1, upper = (sub >> 1) & 1;
            const __m256i q = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32 * t));
            const __m256i hb = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
            /* 32 codes in byte lanes (16-bit shifts: the masks drop the neighbouring byte's bits), then signed */
            const __m256i lo4 = _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(4 * upper)), _mm256_set1_epi8(0x0F));
            const __m256i hi2 = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(2 * t + 4 * upper)),
                                                 _mm256_set1_epi8(0x03));
            const __m256i c8 = _mm256_sub_epi8(_mm256_or_si256(lo4, _mm256_slli_epi16(hi2, 4)), _mm256_set1_epi8(32));
            *lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(c8));
            *hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(c8, 1));
            *o = 0.0f; /* the two scales come per super-block (qx_k6_factors) */
            return;
        }
        const uint8_t *qs = b + (kind == QX_Q5K ? 48 : 16) + 32 * (sub >> 1);
        /* even sub-blocks: low nibbles, odd: high; 32 codes in byte lanes, then widened */
        __m256i c8 = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)qs), _mm_cvtsi32_si128(4 * (sub & 1))),
                                      _mm256_set1_epi8(0x0F));
        if (kind == QX_Q5K) { /* the fifth bit of sub-block j: bit j of the qh byte at the same position */
            const __m256i hb = _mm256_loadu_si256((const __m256i *)(b + 16));
            const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(sub)), _mm256_set1_epi8(1));
            c8 = _mm256_or_si256(c8, _mm256_slli_epi16(bit, 4));
        }
        __m256i c[2] = {_mm256_cvtepu8_epi16(_mm256_castsi256_si128(c8)), _mm256_cvtepu8_epi16(_mm256_extracti128_si256(c8, 1))};
        *lo = c[0];
        *hi = c[1]; /* the scale and offset come per super-block (qx_k4_factors) */
        return;
    }
    const uint8_t *b = row + j * QX_BYTES[kind];
    if (kind == QX_INT4) { /* byte i: weight 2i in its low nibble, 2i + 1 in its high one (x stored to match) */
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)b));
        *lo = _mm256_and_si256(v, _mm256_set1_epi16(0xF));
        *hi = _mm256_srli_epi16(v, 4);
        if (pre) return; /* the scales and offsets came per run of blocks (qx_int4_factors) */
        const int64_t gi = (32 * j) >> g.gsh;
        const float d = f16_to_f32(g.s[gi]);
        *dd = d;
        *o = -(g.z ? (float)g.z[gi] : 8.0f) * d;
        return;
    }
    if (kind == QX_INT8) { /* 32 signed codes, the row's scale */
        *lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)b));
        *hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 16)));
        *dd = g.rs[0];
        *o = 0.0f;
        return;
    }
    const float d = half_at(b);
    *dd = d;
    if (kind == QX8_0) {
        *lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 2)));
        *hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 18)));
        *o = 0.0f;
        return;
    }
    const int64_t B = QX_BYTES[kind];
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + B - 16)));
    *lo = _mm256_and_si256(v, _mm256_set1_epi16(0xF));
    *hi = _mm256_srli_epi16(v, 4);
    if (kind == QX5_0 || kind == QX5_1) {
        uint32_t qh;
        memcpy(&qh, b + B - 20, 4);
        *lo = _mm256_or_si256(*lo, qx_bit4(qh & 0xFFFF));
        *hi = _mm256_or_si256(*hi, qx_bit4(qh >> 16));
    }
    *o = kind == QX4_1 || kind == QX5_1 ? half_at(b + 2) : -16.0f * d;
}

static inline __attribute__((always_inline)) float qx_hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* one block's codes (lo, hi) against nm x rows, row m's 32 values at x + m * ldx, into part[m]: times the block's
 * scale d0 (q6_k: two scales, d0 and d1, its halves' sums apart) */
static inline __attribute__((always_inline)) void qx_madd_rows(int kind, int nm, __m256i lo, __m256i hi, __m256 d0,
                                                               __m256 d1, const int16_t *x, int64_t ldx, __m256 *part) {
    for (int m = 0; m < nm; m++) {
        const int16_t *xm = x + m * ldx;
        const __m256i p0 = _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)xm)),
                      p1 = _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(xm + 16)));
        if (kind == QX_Q6K)
            part[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), d1, _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), d0, part[m]));
        else
            part[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)), d0, part[m]);
    }
}

/* block j of weight row r (of R from w) against mb x rows, into part[r]; pre: int4's scales and offsets are in fk
 * and ob already */
static inline __attribute__((always_inline)) void qx_block_dot(int kind, int R, int mb, const uint8_t *w, int64_t ldw,
                                                               int64_t K, const int16_t *xq, qx_groups g, int64_t j,
                                                               int r, float *obj, float fk[4][2 * QX_SB],
                                                               __m256 part[4][QXM], int pre) {
    const uint8_t *row = w + r * ldw;
    /* this block, 4 row groups on (K-quants: an eighth of the super-block per sub-block, so that
       every cache line of it is fetched) */
    const int64_t at = kind >= QX_Q4K ? (j >> 3) * QX_SUPER[kind - QX_Q4K] + (j & 7) * (QX_SUPER[kind - QX_Q4K] / 8)
                                      : j * QX_BYTES[kind];
    _mm_prefetch((const char *)(row + 4 * R * ldw + at), _MM_HINT_T0);
    __m256i lo, hi;
    float d = 0.0f;
    qx_codes(kind, row, &lo, &hi, &d, obj, kind == QX_INT4 || kind == QX_INT8 ? qx_rows_from(g, r) : g,
             j, pre);
    if (kind == QX_Q6K) {
        qx_madd_rows(kind, mb, lo, hi, _mm256_broadcast_ss(&fk[r][2 * (j & 7)]),
                     _mm256_broadcast_ss(&fk[r][2 * (j & 7) + 1]), xq + 32 * j, K, part[r]);
        return;
    }
    if (kind == QX_Q4K || kind == QX_Q5K || (kind == QX_INT4 && pre)) d = fk[r][j & 7];
    const __m256 dv = _mm256_set1_ps(d);
    qx_madd_rows(kind, mb, lo, hi, dv, dv, xq + 32 * j, K, part[r]);
}

/* out[r][m] = weight row r . x row m for R rows of ldw bytes against mb x rows (xq, dx, xs at row 0 of them);
 * g: int4's groups or int8's row scales from the first of the R rows */
static inline __attribute__((always_inline)) void qx_rows(int kind, int R, int mb, const uint8_t *w, int64_t ldw,
                                                          int64_t nb, int64_t K, const int16_t *xq, const float *dx,
                                                          const float *xs, qx_groups g, float out[4][QXM]) {
    __m256 acc[4][QXM];
    float ob[4][nb]; /* each block's offset */
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) acc[r][m] = _mm256_setzero_ps();
    const int64_t nsb = (nb + QX_SB - 1) / QX_SB;
    for (int64_t sb = 0; sb < nsb; sb++) {
        __m256 part[4][QXM]; /* this scale's sums */
        for (int r = 0; r < R; r++)
            for (int m = 0; m < mb; m++) part[r][m] = _mm256_setzero_ps();
        const int64_t j1 = (sb + 1) * QX_SB < nb ? (sb + 1) * QX_SB : nb;
        float fk[4][2 * QX_SB]; /* K-quants: each row's sub-block (q6_k: half sub-block) scales; a run is one
                                   super-block */
        if (kind == QX_Q4K || kind == QX_Q5K)
            for (int r = 0; r < R; r++)
                qx_k4_factors(w + r * ldw + sb * QX_SUPER[kind - QX_Q4K], fk[r], &ob[r][sb * QX_SB]);
        if (kind == QX_Q6K)
            for (int r = 0; r < R; r++) qx_k6_factors(w + r * ldw + sb * QX_SUPER[kind - QX_Q4K], fk[r]);
        const int int4_runs = kind == QX_INT4 && R >= 2 && g.gsh == 5 && j1 - sb * QX_SB == QX_SB;
        if (int4_runs)
            for (int r = 0; r < R; r++) {
                const qx_groups gr = qx_rows_from(g, r);
                qx_int4_factors(gr.s, gr.z, gr.gsh, sb * QX_SB, j1, fk[r], &ob[r][sb * QX_SB]);
            }
        if (kind >= QX_Q4K || int4_runs) { /* whole runs, unrolled: K-quants' shifts take immediates */
#pragma GCC unroll 8
            for (int i = 0; i < QX_SB; i++)
                for (int r = 0; r < R; r++) {
                    const int64_t j = sb * QX_SB + i;
                    qx_block_dot(kind, R, mb, w, ldw, K, xq, g, j, r, &ob[r][j], fk, part, 1);
                }
        } else {
            for (int64_t j = sb * QX_SB; j < j1; j++)
                for (int r = 0; r < R; r++) qx_block_dot(kind, R, mb, w, ldw, K, xq, g, j, r, &ob[r][j], fk, part, 0);
        }
        for (int m = 0; m < mb; m++) {
            const __m256 d = _mm256_broadcast_ss(dx + m * nsb + sb);
            for (int r = 0; r < R; r++) acc[r][m] = _mm256_fmadd_ps(part[r][m], d, acc[r][m]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < mb; m++) {
            float off = 0.0f;
            if (kind != QX8_0 && kind != QX_INT8 && kind != QX_Q6K) {
                __m256 t = _mm256_setzero_ps();
                int64_t j = 0;
                for (; j + 8 <= nb; j += 8)
                    t = _mm256_fmadd_ps(_mm256_loadu_ps(&ob[r][j]), _mm256_loadu_ps(xs + m * nb + j), t);
                off = qx_hsum(t);
                for (; j < nb; j++) off += ob[r][j] * xs[m * nb + j];
            }
            out[r][m] = qx_hsum(acc[r][m]) + off;
        }
}

/* weight rows [blk * R, +R) (fewer at the end) against every x row, into y */
static inline __attribute__((always_inline)) void qx_block(int kind, int R, int64_t blk, int64_t M, int64_t K,
                                                           int64_t nb, const uint8_t *w, int64_t ldw, int64_t N,
                                                           const int16_t *xq, const float *dx, const float *xs,
                                                           qx_groups g, const float *bias, uint16_t *y) {
    const int64_t n0 = blk * R;
    const int rows = N - n0 < R ? (int)(N - n0) : R;
    for (int64_t m0 = 0; m0 < M; m0 += QXM) {
        const int mb = M - m0 < QXM ? (int)(M - m0) : QXM;
        float r[4][QXM];
        const int16_t *xm = xq + m0 * K;
        const float *dm = dx + m0 * ((nb + QX_SB - 1) / QX_SB), *sm = xs + m0 * nb;
        if (rows == 4) { /* R = 4: one x row */
            qx_rows(kind, 4, 1, w + n0 * ldw, ldw, nb, K, xm, dm, sm, qx_rows_from(g, n0), r);
        } else if (rows == 2 && R == 2) { /* two or three x rows */
#define TWO_ROWS(MBC) qx_rows(kind, 2, MBC, w + n0 * ldw, ldw, nb, K, xm, dm, sm, qx_rows_from(g, n0), r)
            if (mb == 2) TWO_ROWS(2); else TWO_ROWS(3);
#undef TWO_ROWS
        } else {
            for (int i = 0; i < rows; i++) {
                float r1[4][QXM];
#define ONE_ROW(MBC) qx_rows(kind, 1, MBC, w + (n0 + i) * ldw, ldw, nb, K, xm, dm, sm, qx_rows_from(g, n0 + i), r1)
                SWITCH_MB(mb, ONE_ROW);
#undef ONE_ROW
                for (int m = 0; m < mb; m++) r[i][m] = r1[0][m];
            }
        }
        for (int i = 0; i < rows; i++)
            for (int m = 0; m < mb; m++) store_out(y + m0 * N, N, m, n0 + i, r[i][m], bias);
    }
}

/* ---------------------------------------------------------------- many x rows: one weight row against QXG at a time */

#define QXG 8 /* x rows per register block of the many-row kernel */
#define QX_MANY_MIN_ROWS 7 /* from this many x rows on (measured: 0.95-1.0x at 5-6 rows, 1.1x at 7) */

/* a weight row's scales per block, d[j] (q6_k: d[2j] and d[2j + 1], its halves'), and offsets o[j] (g from this
 * row on) */
static inline __attribute__((always_inline)) void qx_row_scales(int kind, const uint8_t *row, int64_t nb, qx_groups g,
                                                                float *d, float *o) {
    if (kind == QX_Q4K || kind == QX_Q5K) {
        for (int64_t s = 0; s < nb / 8; s++) qx_k4_factors(row + s * QX_SUPER[kind - QX_Q4K], d + 8 * s, o + 8 * s);
        return;
    }
    if (kind == QX_Q6K) {
        for (int64_t s = 0; s < nb / 8; s++) qx_k6_factors(row + s * QX_SUPER[kind - QX_Q4K], d + 16 * s);
        return;
    }
    if (kind == QX_INT4) {
        for (int64_t j0 = 0; j0 < nb; j0 += QX_SB)
            qx_int4_factors(g.s, g.z, g.gsh, j0, j0 + QX_SB < nb ? j0 + QX_SB : nb, d + j0, o + j0);
        return;
    }
    for (int64_t j = 0; j < nb; j++) {
        __m256i lo, hi;
        qx_codes(kind, row, &lo, &hi, &d[j], &o[j], g, j, 0);
    }
}

/* block j of a weight row against nm x rows into part[m] */
static inline __attribute__((always_inline)) void qx_group_block(int kind, int nm, const uint8_t *row, int64_t ldw,
                                                                 int64_t K, const int16_t *xq, qx_groups g,
                                                                 const float *d, int64_t j, __m256 part[QXG]) {
    const int64_t at = kind >= QX_Q4K ? (j >> 3) * QX_SUPER[kind - QX_Q4K] + (j & 7) * (QX_SUPER[kind - QX_Q4K] / 8)
                                      : j * QX_BYTES[kind];
    _mm_prefetch((const char *)(row + ldw + at), _MM_HINT_T0); /* the next weight row */
    __m256i lo, hi;
    float dd, oo;
    qx_codes(kind, row, &lo, &hi, &dd, &oo, g, j, 1);
    const __m256 d0 = _mm256_broadcast_ss(kind == QX_Q6K ? d + 2 * j : d + j),
                 d1 = kind == QX_Q6K ? _mm256_broadcast_ss(d + 2 * j + 1) : d0;
    qx_madd_rows(kind, nm, lo, hi, d0, d1, xq + j * QXG * 32, 32, part); /* xq: the group's rows, block-interleaved */
}

/* a weight row (scales d, offsets o) against nm x rows of xq; dxT [nsb, ldt] and xsT [nb, ldt] are dx and xs
 * transposed, from the first of the nm rows on. Lane m of the result: the dot product with x row m */
static inline __attribute__((always_inline)) __m256 qx_row_group(int kind, int nm, const uint8_t *row, int64_t ldw,
                                                                 int64_t nb, int64_t K, const int16_t *xq,
                                                                 const float *dxT, const float *xsT, int64_t ldt,
                                                                 qx_groups g, const float *d, const float *o) {
    __m256 acc = _mm256_setzero_ps();
    const int64_t nsb = (nb + QX_SB - 1) / QX_SB;
    for (int64_t sb = 0; sb < nsb; sb++) {
        __m256 part[QXG];
        for (int m = 0; m < QXG; m++) part[m] = _mm256_setzero_ps();
        const int64_t j0 = sb * QX_SB, j1 = j0 + QX_SB < nb ? j0 + QX_SB : nb;
        if (j1 - j0 == QX_SB) {
#pragma GCC unroll 8
            for (int i = 0; i < QX_SB; i++) qx_group_block(kind, nm, row, ldw, K, xq, g, d, j0 + i, part);
        } else {
            for (int64_t j = j0; j < j1; j++) qx_group_block(kind, nm, row, ldw, K, xq, g, d, j, part);
        }
        /* the run's sums as one vector (lane m), times each x row's scale of the run */
        acc = _mm256_fmadd_ps(s5_sum8(part), _mm256_loadu_ps(dxT + sb * ldt), acc);
    }
    if (kind != QX8_0 && kind != QX_INT8 && kind != QX_Q6K) { /* four chains: FMA latency */
        __m256 t[4] = {acc, _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        int64_t j = 0;
        for (; j + 4 <= nb; j += 4)
            for (int i = 0; i < 4; i++)
                t[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(o + j + i), _mm256_loadu_ps(xsT + (j + i) * ldt), t[i]);
        for (; j < nb; j++) t[0] = _mm256_fmadd_ps(_mm256_broadcast_ss(o + j), _mm256_loadu_ps(xsT + j * ldt), t[0]);
        acc = _mm256_add_ps(_mm256_add_ps(t[0], t[1]), _mm256_add_ps(t[2], t[3]));
    }
    return acc;
}

/* weight row n against every x row, QXG at a time */
static inline __attribute__((always_inline)) void qx_row_many(int kind, int64_t n, int64_t M, int64_t K, int64_t nb,
                                                              const uint8_t *w, int64_t ldw, int64_t N,
                                                              const int16_t *xqB, const float *dxT, const float *xsT,
                                                              int64_t ldt, qx_groups g, const float *bias,
                                                              uint16_t *y) {
    const uint8_t *row = w + n * ldw;
    const qx_groups gr = qx_rows_from(g, n);
    float d[2 * nb], o[nb];
    qx_row_scales(kind, row, nb, gr, d, o);
    for (int64_t m0 = 0; m0 < M; m0 += QXG) {
        const int mb = M - m0 < QXG ? (int)(M - m0) : QXG;
        __m256 r;
#define GROUP(MBC) r = qx_row_group(kind, MBC, row, ldw, nb, K, xqB + m0 * K, dxT + m0, xsT + m0, ldt, gr, d, o)
        if (mb <= 4) /* the rows past M are zeros */
            GROUP(4);
        else
            GROUP(8);
#undef GROUP
        float t[QXG];
        _mm256_storeu_ps(t, r);
        for (int m = 0; m < mb; m++) store_out(y + m0 * N, N, m, n, t[m], bias);
    }
}

/* every weight row block against every x row, one function per kind: the OpenMP region of PAR_FOR is outlined
 * into a function of its own where it is written, so each kind needs its own region to keep its constant kind
 * (one shared region of an inlined helper lost the specialisation: 1.4x slower at one row) */
#define QX_PAR_FN(KIND)                                                                                         \
    static void qx_par_##KIND(int64_t M, int64_t K, int64_t nb, const uint8_t *w, int64_t ldw, int64_t N,       \
                              const int16_t *xq, const float *dx, const float *xs, const float *dxT,            \
                              const float *xsT, const int16_t *xqB, int64_t ldt, qx_groups g,                   \
                              const float *bias, uint16_t *y) {                                                 \
        /* weight rows per block: several for few x rows (more loads in flight, codes unpacked once for more x   \
         * rows); two at 2-3 rows, 1.0-1.2x one (int4 at 3 rows: 0.9x, one) */                                  \
        /* each R its own region, so that each is compiled for its constant R (one region with R chosen at run \
         * time made the one-row case 1.1x slower) */                                                           \
        const int par = N * ldw * M > PAR_MIN_WORK;                                                             \
        if (M == 1)                                                                                             \
            PAR_FOR(par, blk, (N + 3) / 4, { qx_block(KIND, 4, blk, M, K, nb, w, ldw, N, xq, dx, xs, g, bias, y); }); \
        else if (M == 2 || (M == 3 && KIND != QX_INT4))                                                         \
            PAR_FOR(par, blk, (N + 1) / 2, { qx_block(KIND, 2, blk, M, K, nb, w, ldw, N, xq, dx, xs, g, bias, y); }); \
        else if (M < QX_MANY_MIN_ROWS)                                                                          \
            PAR_FOR(par, blk, N, { qx_block(KIND, 1, blk, M, K, nb, w, ldw, N, xq, dx, xs, g, bias, y); });     \
        else                                                                                                    \
            PAR_FOR(par, n, N, { qx_row_many(KIND, n, M, K, nb, w, ldw, N, xqB, dxT, xsT, ldt, g, bias, y); }); \
    }
QX_PAR_FN(QX8_0)
QX_PAR_FN(QX4_1)
QX_PAR_FN(QX5_0)
QX_PAR_FN(QX5_1)
QX_PAR_FN(QX_INT4)
QX_PAR_FN(QX_INT8)
QX_PAR_FN(QX_Q4K)
QX_PAR_FN(QX_Q5K)
QX_PAR_FN(QX_Q6K)
#undef QX_PAR_FN
#define QX_RUN(KIND) qx_par_##KIND(M, K, nb, w, ldw, N, xq, dx, xs, dxT, xsT, xqB, ldt, g, bias, y)

static inline __attribute__((always_inline)) void qx_gemv(int kind, const uint16_t *x, int64_t M, int64_t K,
                                                          const uint8_t *w, int64_t N, qx_groups g, const float *bias,
                                                          uint16_t *y) {
    const int64_t nb = K / 32, ldw = qx_row_bytes(kind, K);
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(M * K));
    float *xs = malloc(sizeof(float) * (size_t)(2 * M * nb)), *dx = xs + M * nb; /* dx: M * nsb <= M * nb */
    uint16_t *xp = NULL;
    if (kind == QX_INT4) { /* each 32 values as the nibbles hold them: even elements, then odd ones */
        xp = malloc(sizeof(uint16_t) * (size_t)(M * K));
        for (int64_t i = 0; i < M * K; i += 32)
            for (int e = 0; e < 16; e++) xp[i + e] = x[i + 2 * e], xp[i + 16 + e] = x[i + 2 * e + 1];
        x = xp;
    }
    qx_quantize(x, M, K, xq, dx, xs);
    /* the many-row kernel reads dx and xs transposed, a lane per x row, padded with zeros to whole vectors */
    const int64_t nsb = (nb + QX_SB - 1) / QX_SB, ldt = (M + QXG - 1) / QXG * QXG;
    float *dxT = NULL, *xsT = NULL;
    int16_t *xqB = NULL;
    if (M >= QX_MANY_MIN_ROWS) {
        dxT = calloc((size_t)((nsb + nb) * ldt), sizeof(float));
        xsT = dxT + nsb * ldt;
        xqB = calloc((size_t)(ldt * K), sizeof(int16_t)); /* [group of QXG rows][block][row in group][32] */
        for (int64_t m = 0; m < M; m++) {
            for (int64_t sb = 0; sb < nsb; sb++) dxT[sb * ldt + m] = dx[m * nsb + sb];
            for (int64_t j = 0; j < nb; j++) {
                xsT[j * ldt + m] = xs[m * nb + j];
                memcpy(xqB + (((m / QXG) * nb + j) * QXG + m % QXG) * 32, xq + m * K + 32 * j, 64);
            }
        }
    }
    switch (kind) {
    case QX4_1: QX_RUN(QX4_1); break;
    case QX5_0: QX_RUN(QX5_0); break;
    case QX5_1: QX_RUN(QX5_1); break;
    case QX_INT4: QX_RUN(QX_INT4); break;
    case QX_INT8: QX_RUN(QX_INT8); break;
    case QX_Q4K: QX_RUN(QX_Q4K); break;
    case QX_Q5K: QX_RUN(QX_Q5K); break;
    case QX_Q6K: QX_RUN(QX_Q6K); break;
    default: QX_RUN(QX8_0);
    }
    free(xqB);
    free(dxT);
    free(xp);
    free(xs);
    free(xq);
}
#undef QX_RUN

/* gemv_qb on AVX2 for bf16 x and y, any M; one compiled copy per kind */
void qb_gemv_x16_avx2(int kind, const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
                      const float *bias, uint16_t *y) {
    const qx_groups none = {NULL, NULL, 0, 0, NULL};
    switch (kind) {
    case QX4_1: qx_gemv(QX4_1, x, M, K, w, N, none, bias, y); break;
    case QX5_0: qx_gemv(QX5_0, x, M, K, w, N, none, bias, y); break;
    case QX5_1: qx_gemv(QX5_1, x, M, K, w, N, none, bias, y); break;
    default: qx_gemv(QX8_0, x, M, K, w, N, none, bias, y);
    }
}

/* gemv_int4 on AVX2 for groups G a multiple of 32 (the caller checks), any M: the same arguments */
void int4_gemv_x16_avx2(const uint16_t *x, int64_t M, int64_t Kp, const uint8_t *w, int64_t N, int64_t G,
                        const uint16_t *scale, const uint8_t *zeros, const float *bias, uint16_t *y) {
    const qx_groups g = {scale, zeros, Kp / G, __builtin_ctzll((unsigned long long)G), NULL};
    qx_gemv(QX_INT4, x, M, Kp, w, N, g, bias, y);
}

/* gemv_kq on AVX2 (kind 0 q4_k, 1 q5_k, 2 q6_k; K a multiple of 256), any M: the same arguments */
void kq_gemv_x16_avx2(int kind, const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
                      const float *bias, uint16_t *y) {
    const qx_groups none = {NULL, NULL, 0, 0, NULL};
    qx_gemv(QX_Q4K + kind, x, M, K, w, N, none, bias, y);
}

/* gemv_int8 on AVX2 for K a multiple of 32 (the caller checks), any M: the same arguments */
void int8_gemv_x16_avx2(const uint16_t *x, int64_t M, int64_t K, const int8_t *w, int64_t N, const float *scale,
                        const float *bias, uint16_t *y) {
    const qx_groups g = {NULL, NULL, 0, 0, scale};
    qx_gemv(QX_INT8, x, M, K, (const uint8_t *)w, N, g, bias, y);
}

#else
typedef int quant_cpu_q32x16_avx2_unused; /* the AVX-512 build has its own kernel (quant_cpu_q32.c) */
#endif
