/* Rotary position embedding of bf16 heads (HF's rotate_half convention), one call for a whole [T, H, D] tensor.
 *
 * Numerics match torch's bf16 `x * cos + rotate_half(x) * sin`: each product is rounded to bf16, then the sum.
 * The input may be a strided view (q, k or v split out of a fused projection): rows of T are `stride_t` apart,
 * heads within a row are contiguous. The output is contiguous [T, H, D]. rope_f32: the same in fp32 (a float32
 * model's heads and tables), each product rounded to fp32 before the sum, as torch's ops.
 */
#include "quant_cpu.h"

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
                __m512 a = bf16x16_load(xr + j, m), b = bf16x16_load(xr + half + j, m);
                __m512 lo = _mm512_sub_ps(bf16_round_ps(_mm512_mul_ps(a, bf16x16_load(c + j, m))), bf16_round_ps(_mm512_mul_ps(b, bf16x16_load(s + j, m))));
                __m512 hi = _mm512_add_ps(bf16_round_ps(_mm512_mul_ps(b, bf16x16_load(c + half + j, m))),
                                          bf16_round_ps(_mm512_mul_ps(a, bf16x16_load(s + half + j, m))));
                _mm256_mask_storeu_epi16(o + j, m, (__m256i)_mm512_cvtneps_pbh(lo));
                _mm256_mask_storeu_epi16(o + half + j, m, (__m256i)_mm512_cvtneps_pbh(hi));
            }
        }
    }
}

/* rope_bf16 for fp32 x, cos, sin, out */
void rope_f32(const float *x, int64_t T, int64_t H, int64_t D, int64_t stride_t, const float *cos, const float *sin,
              float *out) {
    const int64_t half = D / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + t * D, *s = sin + t * D;
        for (int64_t h = 0; h < H; h++) {
            const float *xr = x + t * stride_t + h * D;
            float *o = out + (t * H + h) * D;
            for (int64_t j = 0; j < half; j += 16) {
                __mmask16 m = tail16(half - j);
                __m512 a = _mm512_maskz_loadu_ps(m, xr + j), b = _mm512_maskz_loadu_ps(m, xr + half + j);
                __m512 lo = _mm512_sub_ps(_mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, c + j)),
                                          _mm512_mul_ps(b, _mm512_maskz_loadu_ps(m, s + j)));
                __m512 hi = _mm512_add_ps(_mm512_mul_ps(b, _mm512_maskz_loadu_ps(m, c + half + j)),
                                          _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, s + half + j)));
                _mm512_mask_storeu_ps(o + j, m, lo);
                _mm512_mask_storeu_ps(o + half + j, m, hi);
            }
        }
    }
}
