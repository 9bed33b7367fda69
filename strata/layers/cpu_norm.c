/* RMSNorm of bf16 rows, optionally fused with the residual add before it (the decoder's x + h, then norm).
 *
 * With transformers' numerics: the sum x + h is rounded to bf16 (it is the new residual), normalised in fp32,
 * rounded to bf16, then multiplied by the bf16 weight and rounded again. Only the order of the fp32 sum of
 * squares differs from torch. At decode a row is 2-8 KiB, so the cost is the ~6 torch ops this replaces.
 * rms_norm_f32 is the same for a float32 model (fp32 rows and weight, nothing rounded to bf16).
 */
#include "quant_cpu.h"

/* out[t] = w * norm(s[t]) with s = x + res (res_out[t] = s) when res is given, else s = x.
 * x, res, res_out, out bf16 [T, H]; w bf16 [H]. res_out may alias res. */
void rms_norm_bf16(const uint16_t *x, const uint16_t *res, const uint16_t *w, int64_t T, int64_t H, float eps,
                   uint16_t *out, uint16_t *res_out) {
    PAR_FOR(T * H > (1 << 16), t, T, {
        const uint16_t *xr = x + t * H;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t k = 0; k < H; k += 16) {
            __mmask16 m = tail16(H - k);
            __m512 s = bf16x16_load(xr + k, m);
            if (res) {
                s = bf16_round_ps(_mm512_add_ps(s, bf16x16_load(res + t * H + k, m)));
                _mm256_mask_storeu_epi16(res_out + t * H + k, m, (__m256i)_mm512_cvtneps_pbh(s));
            }
            ss = _mm512_fmadd_ps(s, s, ss);
        }
        const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)H + eps));
        const uint16_t *sr = res ? res_out + t * H : xr;
        for (int64_t k = 0; k < H; k += 16) {
            __mmask16 m = tail16(H - k);
            __m512 h = bf16_round_ps(_mm512_mul_ps(bf16x16_load(sr + k, m), r));
            __m512 y = _mm512_mul_ps(h, bf16x16_load(w + k, m));
            _mm256_mask_storeu_epi16(out + t * H + k, m, (__m256i)_mm512_cvtneps_pbh(y));
        }
    });
}

/* rms_norm_bf16 in fp32: x, res, res_out, out fp32 [T, H]; w fp32 [H]. res_out may alias res. */
void rms_norm_f32(const float *x, const float *res, const float *w, int64_t T, int64_t H, float eps, float *out,
                  float *res_out) {
    PAR_FOR(T * H > (1 << 16), t, T, {
        const float *xr = x + t * H;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t k = 0; k < H; k += 16) {
            __mmask16 m = tail16(H - k);
            __m512 s = _mm512_maskz_loadu_ps(m, xr + k);
            if (res) {
                s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(m, res + t * H + k));
                _mm512_mask_storeu_ps(res_out + t * H + k, m, s);
            }
            ss = _mm512_fmadd_ps(s, s, ss);
        }
        const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)H + eps));
        const float *sr = res ? res_out + t * H : xr;
        for (int64_t k = 0; k < H; k += 16) {
            __mmask16 m = tail16(H - k);
            __m512 h = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sr + k), r);
            _mm512_mask_storeu_ps(out + t * H + k, m, _mm512_mul_ps(h, _mm512_maskz_loadu_ps(m, w + k)));
        }
    });
}
