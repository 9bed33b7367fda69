/* Dequantization to bf16 for the batched path (the result goes to a bf16 matmul), int4 to float32 for the float32
 * tiles of CPUs without AVX-512 BF16, and the ABI version. */
#include "quant_cpu.h"

int strata_qk_abi(void) { return 16; }

/* ---------------------------------------------------------------- dequantize to bf16 (batched path) */

/* rows [n0, n1) -> out [n1 - n0, K] bf16, scales applied (fp32 per row, or fp16 per group for nested) */
static void dequant8(int kind, const uint8_t *w, int64_t K, int64_t G, const void *scale, int64_t n0,
                     int64_t n1, uint16_t *out) {
    const int gsh = __builtin_ctzll((unsigned long long)G);
    const __m512 off = _mm512_set1_ps(kind == K_I8 ? OFF_I8 : kind == K_U8 ? OFF_U8 + 136.0f : 0.0f);
    PAR_FOR((n1 - n0) * K > PAR_MIN_WORK, i, n1 - n0, {
        const int64_t n = n0 + i;
        const uint8_t *wr = w + n * K;
        uint16_t *o = out + (n - n0) * K;
        __m512 s = _mm512_set1_ps(kind == K_U8 ? 0.0f : ((const float *)scale)[n] * (kind == K_F8 ? 256.0f : 1.0f));
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 mask = tail16(K - k);
            if (kind == K_U8)
                s = _mm512_set1_ps(f16_to_f32(((const uint16_t *)scale)[n * (K >> gsh) + (k >> gsh)]));
            __m512 v = _mm512_mul_ps(_mm512_sub_ps(load16(kind, wr + k, mask), off), s);
            __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
            if (mask == 0xFFFF) /* masked stores are slow on some CPUs (AMD Zen 4/5): tail only */
                _mm256_storeu_si256((__m256i *)(o + k), h);
            else
                _mm256_mask_storeu_epi16(o + k, mask, h);
        }
    });
}

void dequant_int8(const int8_t *w, int64_t K, const float *scale, int64_t n0, int64_t n1, uint16_t *out) {
    dequant8(K_I8, (const uint8_t *)w, K, 1, scale, n0, n1, out);
}

void dequant_fp8(const uint8_t *w, int64_t K, const float *scale, int64_t n0, int64_t n1, uint16_t *out) {
    dequant8(K_F8, w, K, 1, scale, n0, n1, out);
}

void dequant_nested(const uint8_t *w, int64_t Kp, int64_t G, const uint16_t *scale, int64_t n0, int64_t n1,
                    uint16_t *out) {
    dequant8(K_U8, w, Kp, G, scale, n0, n1, out);
}

/* int4 rows [n0, n1) -> out [n1 - n0, Kp]: per group a 16-entry bf16 table (q - z) * s, indexed by vpermw */
void dequant_int4(const uint8_t *w, int64_t Kp, int64_t G, const uint16_t *scale, const uint8_t *zeros,
                  int64_t n0, int64_t n1, uint16_t *out) {
    int64_t ng = Kp / G;
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i nib = _mm512_set1_epi32(0x000F000F);
    PAR_FOR((n1 - n0) * Kp > PAR_MIN_WORK, i, n1 - n0, {
        const int64_t n = n0 + i;
        const uint8_t *wr = w + n * (Kp / 2);
        uint16_t *o = out + (n - n0) * Kp;
        for (int64_t g = 0; g < ng; g++) {
            float s = f16_to_f32(scale[n * ng + g]);
            float z = zeros ? (float)zeros[n * ng + g] : 8.0f;
            __m512i lut = _mm512_castsi256_si512(
                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(s))));
            for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
                __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wr + k / 2)));
                /* dword j = byte j: low nibble to 16-bit lane 2j, high nibble to lane 2j + 1 */
                d = _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 12), nib, 0xA8);
                _mm512_storeu_si512(o + k, _mm512_permutexvar_epi16(d, lut));
            }
        }
    });
}

/* int4 rows [n0, n1) -> out [n1 - n0, Kp] float32, (q - z) * s exactly (the product of a 4-bit code difference and an
 * fp16 scale fits fp32's mantissa): the float32 tiles of QuantLinear on CPUs without AVX-512 BF16, where the bf16
 * table above runs its vpermw lane by lane and the tiles then widen bf16 to fp32 in torch (about 1 ns a weight
 * together). AVX2 only, so both builds have it. G a multiple of 32 (every int4 format: groups of 32-1024). */
void dequant_int4_f32(const uint8_t *w, int64_t Kp, int64_t G, const uint16_t *scale, const uint8_t *zeros,
                      int64_t n0, int64_t n1, float *out) {
    const int64_t ng = Kp / G;
    PAR_FOR((n1 - n0) * Kp > PAR_MIN_WORK, i, n1 - n0, {
        const int64_t n = n0 + i;
        const uint8_t *wr = w + n * (Kp / 2);
        float *o = out + (n - n0) * Kp;
        for (int64_t g = 0; g < ng; g++) {
            const float s = f16_to_f32(scale[n * ng + g]), z = zeros ? (float)zeros[n * ng + g] : 8.0f;
            const __m256 sv = _mm256_set1_ps(s), off = _mm256_set1_ps(-z * s);
            for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
                /* byte i: weight 2i in its low nibble, 2i + 1 in its high one: interleaved back into 32 bytes */
                const __m128i b = _mm_loadu_si128((const __m128i *)(wr + k / 2));
                const __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
                const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
                const __m128i q[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};
                for (int h = 0; h < 2; h++) {
                    const __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q[h]));
                    const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(q[h], q[h])));
                    _mm256_storeu_ps(o + k + 16 * h, _mm256_fmadd_ps(a, sv, off));
                    _mm256_storeu_ps(o + k + 16 * h + 8, _mm256_fmadd_ps(c, sv, off));
                }
            }
        }
    });
}
