/* MXFP4 (OCP Microscaling, gpt-oss experts): GEMV and dequantization to bf16.
 *
 * Layout: w [N, K / 2] e2m1 codes, element 2j in the low nibble of byte j; scale [N, K / 32] e8m0 exponents e,
 * value = e2m1(code) * 2^(e - 127). K is a multiple of 32. Every e2m1 value is exact in bf16, so a group of
 * 32 elements (16 bytes) becomes 32 bf16 numbers through a 16-entry table (vpermw) and meets x on vdpbf16ps;
 * the group's power of two then scales its 16 fp32 partial sums.
 */
#include "quant_cpu.h"

/* e2m1 code -> bf16 bits: 0, 0.5, 1, 1.5, 2, 3, 4, 6, then the same negated; upper half unused by vpermw */
static const uint16_t E2M1_BF16[32] = {0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
                                       0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0};

static inline float e8m0_to_f32(uint8_t e) { /* 2^(e - 127); e = 0 is the subnormal 2^-127 */
    uint32_t u = e ? (uint32_t)e << 23 : 0x00400000u;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* 16 code bytes -> 32 bf16 words in element order (dword j = byte j: low nibble to word 2j, high to 2j + 1) */
static inline __m512i decode32(const uint8_t *p, __m512i lut) {
    __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    d = _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 12), _mm512_set1_epi32(0x000F000F), 0xA8);
    return _mm512_permutexvar_epi16(d, lut);
}

/* x [M, K] bf16; y [M, N] bf16 = x @ dequant(w)^T (+ bias fp32) */
void gemv_mxfp4(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const uint8_t *scale,
                const float *bias, uint16_t *y) {
    const int64_t ng = K / 32, nbytes = K / 2;
    const __m512i lut = _mm512_loadu_si512(E2M1_BF16);
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int mb = M - m0 < MB ? (int)(M - m0) : MB;
        const uint16_t *xm = x + m0 * K;
#pragma omp parallel for schedule(static) if (N * nbytes * mb > PAR_MIN_WORK)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *wr = w + n * nbytes, *sr = scale + n * ng;
            __m512 tot[MB];
            for (int m = 0; m < MB; m++) tot[m] = _mm512_setzero_ps();
            for (int64_t g = 0; g < ng; g++) {
                if ((g & 3) == 0) /* the next row's line: see PREFETCH in quant_cpu.h */
                    _mm_prefetch((const char *)(wr + nbytes + g * 16), _MM_HINT_T0);
                __m512bh wv = AS_BH(decode32(wr + g * 16, lut));
                __m512 s = _mm512_set1_ps(e8m0_to_f32(sr[g]));
                for (int m = 0; m < mb; m++) {
                    __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), wv,
                                                  AS_BH(_mm512_loadu_si512(xm + m * K + g * 32)));
                    tot[m] = _mm512_fmadd_ps(acc, s, tot[m]);
                }
            }
            for (int m = 0; m < mb; m++) store_out(y + m0 * N, N, m, n, _mm512_reduce_add_ps(tot[m]), bias);
        }
    }
}

/* rows [n0, n1) -> out [n1 - n0, K] bf16 (exact: every value is a bf16 number) */
void dequant_mxfp4(const uint8_t *w, int64_t K, const uint8_t *scale, int64_t n0, int64_t n1, uint16_t *out) {
    const int64_t ng = K / 32;
    const __m512 vals = bf16x16_load(E2M1_BF16, 0xFFFF); /* the 16 table values as fp32 */
    PAR_FOR((n1 - n0) * K > PAR_MIN_WORK, i, n1 - n0, {
        const int64_t n = n0 + i;
        const uint8_t *wr = w + n * (K / 2), *sr = scale + n * ng;
        uint16_t *o = out + (n - n0) * K;
        for (int64_t g = 0; g < ng; g++) {
            __m512i scaled = _mm512_castsi256_si512(
                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(vals, _mm512_set1_ps(e8m0_to_f32(sr[g])))));
            _mm512_storeu_si512(o + g * 32, decode32(wr + g * 16, scaled));
        }
    });
}
