/* RMSNorm of bf16 rows, optionally fused with the residual add before it (the decoder's x + h, then norm).
 *
 * With transformers' numerics: the sum x + h is rounded to bf16 (it is the new residual), normalised in fp32,
 * rounded to bf16, then multiplied by the bf16 weight and rounded again. Only the order of the fp32 sum of
 * squares differs from torch. At decode a row is 2-8 KiB, so the cost is the ~6 torch ops this replaces.
 * rms_norm_f32 is the same for a float32 model (fp32 rows and weight, nothing rounded to bf16).
 */
#include "quant_cpu.h"

/* out[t] = w * norm(s[t]) with s = x + res (res_out[t] = s) when res is given, else s = x; x, res, res_out, out
 * [T, H] and w [H] bf16 (every step rounded as above) or fp32 (F32, nothing rounded). res_out may alias res. */
static inline __attribute__((always_inline)) void rms_norm_any(const int F32, const void *x, const void *res,
                                                               const void *w, int64_t T, int64_t H, float eps,
                                                               void *out, void *res_out) {
#define RND(v) (F32 ? (v) : bf16_round_ps(v))
    PAR_FOR(T * H > (1 << 16), t, T, {
        __m512 ss = _mm512_setzero_ps();
        for (int64_t k = 0; k < H; k += 16) {
            __mmask16 m = tail16(H - k);
            __m512 s = load16_any(F32, x, t * H + k, m);
            if (res) {
                s = RND(_mm512_add_ps(s, load16_any(F32, res, t * H + k, m)));
                store16_any(F32, res_out, t * H + k, m, s);
            }
            ss = _mm512_fmadd_ps(s, s, ss);
        }
        const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)H + eps));
        const void *sr = res ? res_out : x;
        for (int64_t k = 0; k < H; k += 16) {
            __mmask16 m = tail16(H - k);
            __m512 h = RND(_mm512_mul_ps(load16_any(F32, sr, t * H + k, m), r));
            store16_any(F32, out, t * H + k, m, _mm512_mul_ps(h, load16_any(F32, w, k, m)));
        }
    });
#undef RND
}

void rms_norm_bf16(const uint16_t *x, const uint16_t *res, const uint16_t *w, int64_t T, int64_t H, float eps,
                   uint16_t *out, uint16_t *res_out) {
    rms_norm_any(0, x, res, w, T, H, eps, out, res_out);
}

void rms_norm_f32(const float *x, const float *res, const float *w, int64_t T, int64_t H, float eps, float *out,
                  float *res_out) {
    rms_norm_any(1, x, res, w, T, H, eps, out, res_out);
}
