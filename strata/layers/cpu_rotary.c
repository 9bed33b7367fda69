/* Rotary position embedding of bf16 heads (HF's rotate_half convention), one call for a whole [T, H, D] tensor.
 *
 * Numerics match torch's bf16 `x * cos + rotate_half(x) * sin`: each product is rounded to bf16, then the sum.
 * The input may be a strided view (q, k or v split out of a fused projection): rows of T are `stride_t` apart,
 * heads within a row are contiguous. The output is contiguous [T, H, D]. rope_f32: the same in fp32 (a float32
 * model's heads and tables), each product rounded to fp32 before the sum, as torch's ops.
 */
#include "quant_cpu.h"

/* out[t, h] = rope(x[t, h]) with cos, sin [T, D]; bf16 (each product rounded to bf16 as torch's bf16 ops) or fp32 */
static inline __attribute__((always_inline)) void rope_any(const int F32, const void *x, int64_t T, int64_t H,
                                                           int64_t D, int64_t stride_t, const void *cos,
                                                           const void *sin, void *out) {
    const int64_t half = D / 2;
#define RND(v) (F32 ? (v) : bf16_round_ps(v))
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t xr = t * stride_t + h * D, o = (t * H + h) * D, c = t * D;
            for (int64_t j = 0; j < half; j += 16) {
                __mmask16 m = tail16(half - j);
                __m512 a = load16_any(F32, x, xr + j, m), b = load16_any(F32, x, xr + half + j, m);
                __m512 lo = _mm512_sub_ps(RND(_mm512_mul_ps(a, load16_any(F32, cos, c + j, m))),
                                          RND(_mm512_mul_ps(b, load16_any(F32, sin, c + j, m))));
                __m512 hi = _mm512_add_ps(RND(_mm512_mul_ps(b, load16_any(F32, cos, c + half + j, m))),
                                          RND(_mm512_mul_ps(a, load16_any(F32, sin, c + half + j, m))));
                store16_any(F32, out, o + j, m, lo);
                store16_any(F32, out, o + half + j, m, hi);
            }
        }
#undef RND
}

void rope_bf16(const uint16_t *x, int64_t T, int64_t H, int64_t D, int64_t stride_t, const uint16_t *cos,
               const uint16_t *sin, uint16_t *out) {
    rope_any(0, x, T, H, D, stride_t, cos, sin, out);
}

void rope_f32(const float *x, int64_t T, int64_t H, int64_t D, int64_t stride_t, const float *cos, const float *sin,
              float *out) {
    rope_any(1, x, T, H, D, stride_t, cos, sin, out);
}
