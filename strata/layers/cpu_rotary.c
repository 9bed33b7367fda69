/* Rotary position embedding of bf16 heads (HF's rotate_half convention), one call for a whole [T, H, D] tensor.
 *
 * Numerics match torch's bf16 `x * cos + rotate_half(x) * sin`: each product is rounded to bf16, then the sum.
 * The input may be a strided view (q, k or v split out of a fused projection): rows of T are `stride_t` apart,
 * heads within a row are contiguous. The output is contiguous [T, H, D].
 */
#include "quant_cpu.h"

static inline __m512 ld(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline __m512 rnd(__m512 v) { /* round to the nearest bf16, kept in fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

/* out[t, h] = rope(x[t, h]) with cos, sin bf16 [T, D] */
void rope_bf16(const uint16_t *x, int64_t T, int64_t H, int64_t D, int64_t stride_t, const uint16_t *cos,
               const uint16_t *sin, uint16_t *out) {
    const int64_t half = D / 2;
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *c = cos + t * D, *s = sin + t * D;
        for (int64_t h = 0; h < H; h++) {
            const uint16_t *xr = x + t * stride_t + h * D;
            uint16_t *o = out + (t * H + h) * D;
            for (int64_t j = 0; j < half; j += 16) {
                __mmask16 m = tail16(half - j);
                __m512 a = ld(xr + j, m), b = ld(xr + half + j, m);
                __m512 lo = _mm512_sub_ps(rnd(_mm512_mul_ps(a, ld(c + j, m))), rnd(_mm512_mul_ps(b, ld(s + j, m))));
                __m512 hi = _mm512_add_ps(rnd(_mm512_mul_ps(b, ld(c + half + j, m))),
                                          rnd(_mm512_mul_ps(a, ld(s + half + j, m))));
                _mm256_mask_storeu_epi16(o + j, m, (__m256i)_mm512_cvtneps_pbh(lo));
                _mm256_mask_storeu_epi16(o + half + j, m, (__m256i)_mm512_cvtneps_pbh(hi));
            }
        }
    }
}
