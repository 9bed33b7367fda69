/* AVX2 stand-ins for the AVX-512 intrinsics that Strata's kernels use, so that the same kernel sources build and
 * run on CPUs with AVX2, FMA and F16C but no AVX-512 (most client CPUs, AMD before Zen 4). quant_cpu.h includes
 * this header when the library is compiled without -mavx512f (quant_native.py picks the flags from the CPU).
 *
 * A 512-bit vector is a pair of 256-bit registers: __m512, __m512i (and __m512bh, 32 bf16 in one) and __m512d are
 * redefined as structs of two halves, which the compiler keeps in registers (GCC's own 64-byte vector types
 * live in memory on a target without AVX-512). Each intrinsic the kernels use is redefined by a macro as a function
 * of the same meaning on the two halves; the few with no AVX2 counterpart that sit off the decode path (16-bit
 * lane permutes, compress stores, masked 8/16-bit tails) go lane by lane. Kernels convert bf16 data with AS_BH(x),
 * a cast to __m512bh under AVX-512 and nothing here.
 *
 * Results are the AVX-512 ones bit for bit, but for two: _mm512_dpbf16_ps adds its two products per lane with two
 * fused multiply-adds, and bf16 rounding keeps denormals (vcvtneps2bf16 flushes them). Masked loads never touch
 * memory outside the mask, as in AVX-512. With 16 registers of 256 bits (AVX-512 has 32 of 512), kernels sized
 * for AVX-512's register file spill some of their accumulators here.
 */
#ifndef STRATA_QUANT_CPU_AVX2_H
#define STRATA_QUANT_CPU_AVX2_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define S5 static inline __attribute__((always_inline))

typedef struct { __m256 lo, hi; } s5_m512;
typedef struct { __m256i lo, hi; } s5_m512i;
typedef struct { __m256d lo, hi; } s5_m512d;
#define __m512 s5_m512
#define __m512i s5_m512i
#define __m512bh s5_m512i
#define __m512d s5_m512d
#define AS_BH(x) (x)

S5 __m512 s5_ps(__m256 lo, __m256 hi) { return (__m512){lo, hi}; }
S5 __m512i s5_si(__m256i lo, __m256i hi) { return (__m512i){lo, hi}; }

/* ---------------------------------------------------------------- masks <-> lanes */

/* all ones in 32-bit lane i where bit i of m is set (8 lanes) */
S5 __m256i s5_lanes8(unsigned m) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)m), bit), bit);
}
S5 __m512i s5_lanes32(unsigned m) { return s5_si(s5_lanes8(m & 0xFF), s5_lanes8(m >> 8 & 0xFF)); }
/* all ones in 16-bit lane i where bit i of m is set (32 lanes) */
S5 __m256i s5_lanes16_half(unsigned m) {
    const __m256i bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                          (short)0x8000);
    return _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)m), bit), bit);
}
S5 __m512i s5_lanes16(unsigned m) { return s5_si(s5_lanes16_half(m & 0xFFFF), s5_lanes16_half(m >> 16)); }
/* bit i set where 32-bit lane i has its top bit set */
S5 __mmask16 s5_bits32(__m512i v) {
    return (__mmask16)(_mm256_movemask_ps(_mm256_castsi256_ps(v.lo)) |
                       _mm256_movemask_ps(_mm256_castsi256_ps(v.hi)) << 8);
}
/* the same for 32 lanes of 16 bits (each all ones or all zeros) */
S5 __mmask32 s5_bits16(__m512i v) {
    return (__mmask32)_mm256_movemask_epi8(_mm256_permute4x64_epi64(_mm256_packs_epi16(v.lo, v.hi), 0xD8));
}
S5 __m512 s5_blend_ps(__m512 src, __mmask16 m, __m512 a) {
    if (m == 0xFFFF) return a;
    __m512i k = s5_lanes32(m);
    return s5_ps(_mm256_blendv_ps(src.lo, a.lo, _mm256_castsi256_ps(k.lo)),
                 _mm256_blendv_ps(src.hi, a.hi, _mm256_castsi256_ps(k.hi)));
}
S5 __m512i s5_blend32(__m512i src, __mmask16 m, __m512i a) {
    __m512i k = s5_lanes32(m);
    return s5_si(_mm256_blendv_epi8(src.lo, a.lo, k.lo), _mm256_blendv_epi8(src.hi, a.hi, k.hi));
}
S5 __m512i s5_blend16(__m512i src, __mmask32 m, __m512i a) {
    __m512i k = s5_lanes16(m);
    return s5_si(_mm256_blendv_epi8(src.lo, a.lo, k.lo), _mm256_blendv_epi8(src.hi, a.hi, k.hi));
}

/* ---------------------------------------------------------------- loads and stores */

S5 __m512 s5_loadu_ps(const void *p) {
    return s5_ps(_mm256_loadu_ps((const float *)p), _mm256_loadu_ps((const float *)p + 8));
}
S5 void s5_storeu_ps(void *p, __m512 v) {
    _mm256_storeu_ps((float *)p, v.lo);
    _mm256_storeu_ps((float *)p + 8, v.hi);
}
S5 __m512i s5_loadu_si512(const void *p) {
    return s5_si(_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)p + 1));
}
S5 void s5_storeu_si512(void *p, __m512i v) {
    _mm256_storeu_si256((__m256i *)p, v.lo);
    _mm256_storeu_si256((__m256i *)p + 1, v.hi);
}
S5 __m512 s5_maskz_loadu_ps(__mmask16 m, const void *p) {
    if (m == 0xFFFF) return s5_loadu_ps(p);
    __m512i k = s5_lanes32(m);
    return s5_ps(_mm256_maskload_ps((const float *)p, k.lo), _mm256_maskload_ps((const float *)p + 8, k.hi));
}
S5 __m512 s5_mask_loadu_ps(__m512 src, __mmask16 m, const void *p) {
    return s5_blend_ps(src, m, s5_maskz_loadu_ps(m, p));
}
S5 void s5_mask_storeu_ps(void *p, __mmask16 m, __m512 v) {
    if (m == 0xFFFF) {
        s5_storeu_ps(p, v);
        return;
    }
    __m512i k = s5_lanes32(m);
    _mm256_maskstore_ps((float *)p, k.lo, v.lo);
    _mm256_maskstore_ps((float *)p + 8, k.hi, v.hi);
}
S5 void s5_mask_storeu_ps256(void *p, __mmask8 m, __m256 v) { _mm256_maskstore_ps((float *)p, s5_lanes8(m), v); }
/* lanes of 1 or 2 bytes have no AVX2 masked form: the lanes in m through a zeroed buffer */
static inline void s5_maskz_copy(void *dst, const void *src, uint64_t m, int lanes, int size) {
    memset(dst, 0, (size_t)lanes * size);
    for (int i = 0; i < lanes; i++)
        if (m >> i & 1) memcpy((char *)dst + i * size, (const char *)src + i * size, size);
}
S5 __m512i s5_maskz_loadu_epi16(__mmask32 m, const void *p) {
    if (m == 0xFFFFFFFFu) return s5_loadu_si512(p);
    uint16_t t[32];
    s5_maskz_copy(t, p, m, 32, 2);
    return s5_loadu_si512(t);
}
S5 __m256i s5_maskz_loadu_epi16_256(__mmask16 m, const void *p) {
    if (m == 0xFFFF) return _mm256_loadu_si256((const __m256i *)p);
    uint16_t t[16];
    s5_maskz_copy(t, p, m, 16, 2);
    return _mm256_loadu_si256((const __m256i *)t);
}
S5 __m256i s5_maskz_loadu_epi8_256(__mmask32 m, const void *p) {
    if (m == 0xFFFFFFFFu) return _mm256_loadu_si256((const __m256i *)p);
    uint8_t t[32];
    s5_maskz_copy(t, p, m, 32, 1);
    return _mm256_loadu_si256((const __m256i *)t);
}
S5 __m128i s5_maskz_loadu_epi8_128(__mmask16 m, const void *p) {
    if (m == 0xFFFF) return _mm_loadu_si128((const __m128i *)p);
    uint8_t t[16];
    s5_maskz_copy(t, p, m, 16, 1);
    return _mm_loadu_si128((const __m128i *)t);
}
S5 void s5_mask_storeu_epi16_256(void *p, __mmask16 m, __m256i v) {
    if (m == 0xFFFF) {
        _mm256_storeu_si256((__m256i *)p, v);
        return;
    }
    uint16_t t[16];
    _mm256_storeu_si256((__m256i *)t, v);
    for (int i = 0; i < 16; i++)
        if (m >> i & 1) ((uint16_t *)p)[i] = t[i];
}
static inline void s5_mask_compressstoreu_32(void *p, __mmask16 m, __m512i v) {
    int32_t lane[16], n = 0;
    s5_storeu_si512(lane, v);
    for (int i = 0; i < 16; i++)
        if (m >> i & 1) memcpy((char *)p + 4 * n++, &lane[i], 4);
}

/* ---------------------------------------------------------------- float arithmetic */

#define S5_PS2(name, op)                                                                                        \
    S5 __m512 name(__m512 a, __m512 b) { return s5_ps(op(a.lo, b.lo), op(a.hi, b.hi)); }
S5_PS2(s5_add_ps, _mm256_add_ps)
S5_PS2(s5_sub_ps, _mm256_sub_ps)
S5_PS2(s5_mul_ps, _mm256_mul_ps)
S5_PS2(s5_div_ps, _mm256_div_ps)
S5_PS2(s5_max_ps, _mm256_max_ps) /* NaN handling of vmaxps: b when either is NaN */
S5_PS2(s5_min_ps, _mm256_min_ps)
S5 __m512d s5_add_pd(__m512d a, __m512d b) { return (__m512d){_mm256_add_pd(a.lo, b.lo), _mm256_add_pd(a.hi, b.hi)}; }
S5 __m512 s5_set1_ps(float a) { return s5_ps(_mm256_set1_ps(a), _mm256_set1_ps(a)); }
S5 __m512 s5_setzero_ps(void) { return s5_ps(_mm256_setzero_ps(), _mm256_setzero_ps()); }
S5 __m512d s5_setzero_pd(void) { return (__m512d){_mm256_setzero_pd(), _mm256_setzero_pd()}; }
S5 __m512 s5_setr_ps(float a0, float a1, float a2, float a3, float a4, float a5, float a6, float a7, float a8,
                     float a9, float a10, float a11, float a12, float a13, float a14, float a15) {
    return s5_ps(_mm256_setr_ps(a0, a1, a2, a3, a4, a5, a6, a7), _mm256_setr_ps(a8, a9, a10, a11, a12, a13, a14, a15));
}
S5 __m512 s5_fmadd_ps(__m512 a, __m512 b, __m512 c) {
    return s5_ps(_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi));
}
S5 __m512 s5_fnmadd_ps(__m512 a, __m512 b, __m512 c) {
    return s5_ps(_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi));
}
S5 __m512 s5_abs_ps(__m512 a) {
    const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    return s5_ps(_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m));
}
S5 __m512 s5_maskz_mov_ps(__mmask16 m, __m512 a) { return s5_blend_ps(s5_setzero_ps(), m, a); }
S5 __m512 s5_mask_max_ps(__m512 src, __mmask16 m, __m512 a, __m512 b) { return s5_blend_ps(src, m, s5_max_ps(a, b)); }
/* lane j + 8, then j + 4, j + 2, j + 1: the order of _mm512_reduce_add_ps */
S5 float s5_reduce_add_ps(__m512 v) {
    __m256 a = _mm256_add_ps(v.lo, v.hi);
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    b = _mm_add_ss(b, _mm_movehdup_ps(b));
    return _mm_cvtss_f32(b);
}
S5 float s5_reduce_max_ps(__m512 v) {
    __m256 a = _mm256_max_ps(v.lo, v.hi);
    __m128 b = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_max_ps(b, _mm_movehl_ps(b, b));
    b = _mm_max_ss(b, _mm_movehdup_ps(b));
    return _mm_cvtss_f32(b);
}
S5 float s5_mask_reduce_max_ps(__mmask16 m, __m512 v) {
    return s5_reduce_max_ps(s5_blend_ps(s5_set1_ps(-__builtin_inff()), m, v));
}
S5 double s5_reduce_add_pd(__m512d v) {
    __m256d a = _mm256_add_pd(v.lo, v.hi);
    __m128d b = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    return _mm_cvtsd_f64(_mm_add_sd(b, _mm_unpackhi_pd(b, b)));
}
S5 __m512 s5_round_nearest(__m512 a) {
    return s5_ps(_mm256_round_ps(a.lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                 _mm256_round_ps(a.hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
/* a * 2^b for integral b in [-126, 127] (exp_ps's range) */
S5 __m256 s5_scalef_half(__m256 a, __m256 b) {
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(b), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(a, _mm256_castsi256_ps(e));
}
S5_PS2(s5_scalef_ps, s5_scalef_half)
/* lane compares under a mask; a NaN compares as the predicate's unordered case, as vcmpps */
#define s5_mask_cmp_ps_mask(m, a, b, pred)                                                                      \
    ((__mmask16)((m) & (_mm256_movemask_ps(_mm256_cmp_ps((a).lo, (b).lo, (pred))) |                            \
                        _mm256_movemask_ps(_mm256_cmp_ps((a).hi, (b).hi, (pred))) << 8)))
/* fpclass 0x99 (QNaN, SNaN, +inf, -inf): the lanes that are not finite */
S5 __mmask16 s5_fpclass_nonfinite(__mmask16 m, __m512 a) {
    __m512 x = s5_abs_ps(a), inf = s5_set1_ps(__builtin_inff());
    return s5_mask_cmp_ps_mask(m, x, inf, _CMP_NLT_UQ);
}

/* ---------------------------------------------------------------- conversions */

S5 __m512 s5_cvtepi32_ps(__m512i a) { return s5_ps(_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)); }
S5 __m512i s5_cvtps_epi32(__m512 a) { return s5_si(_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)); }
S5 __m512 s5_cvtph_ps(__m256i h) {
    return s5_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)));
}
S5 __m512d s5_cvtps_pd(__m256 a) {
    return (__m512d){_mm256_cvtps_pd(_mm256_castps256_ps128(a)), _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1))};
}
S5 __m512i s5_cvtepu8_epi16(__m256i a) {
    return s5_si(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(a)), _mm256_cvtepu8_epi16(_mm256_extracti128_si256(a, 1)));
}
S5 __m512i s5_cvtepu8_epi32(__m128i a) {
    return s5_si(_mm256_cvtepu8_epi32(a), _mm256_cvtepu8_epi32(_mm_srli_si128(a, 8)));
}
S5 __m512i s5_cvtepi8_epi32(__m128i a) {
    return s5_si(_mm256_cvtepi8_epi32(a), _mm256_cvtepi8_epi32(_mm_srli_si128(a, 8)));
}
S5 __m512i s5_cvtepu16_epi32(__m256i a) {
    return s5_si(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(a)), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(a, 1)));
}
/* 32-bit lanes truncated to 16 bits, in order */
S5 __m256i s5_cvtepi32_epi16(__m512i a) {
    const __m256i low16 = _mm256_set1_epi32(0xFFFF);
    __m256i p = _mm256_packus_epi32(_mm256_and_si256(a.lo, low16), _mm256_and_si256(a.hi, low16));
    return _mm256_permute4x64_epi64(p, 0xD8);
}
/* fp32 -> bf16 (8 lanes, in the low 16 bits of each 32-bit lane), round to nearest even, a NaN kept a quiet NaN */
S5 __m256i s5_bf16_round_half(__m256 a) {
    __m256i u = _mm256_castps_si256(a);
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)),
                                 _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
    r = _mm256_srli_epi32(r, 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
}
/* vcvtneps2bf16: 16 fp32 -> 16 bf16 */
S5 __m256i s5_cvtneps_bf16(__m512 a) {
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(s5_bf16_round_half(a.lo), s5_bf16_round_half(a.hi)), 0xD8);
}
/* acc[i] += a[2i+1] * b[2i+1] + a[2i] * b[2i] (bf16 pairs): vdpbf16ps as two fused multiply-adds */
S5 __m256 s5_dpbf16_half(__m256 acc, __m256i a, __m256i b) {
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 ao = _mm256_castsi256_ps(_mm256_and_si256(a, hi)), bo = _mm256_castsi256_ps(_mm256_and_si256(b, hi));
    __m256 ae = _mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), be = _mm256_castsi256_ps(_mm256_slli_epi32(b, 16));
    return _mm256_fmadd_ps(ae, be, _mm256_fmadd_ps(ao, bo, acc));
}
S5 __m512 s5_dpbf16_ps(__m512 acc, __m512i a, __m512i b) {
    return s5_ps(s5_dpbf16_half(acc.lo, a.lo, b.lo), s5_dpbf16_half(acc.hi, a.hi, b.hi));
}

/* ---------------------------------------------------------------- integer lanes */

#define S5_SI2(name, op)                                                                                        \
    S5 __m512i name(__m512i a, __m512i b) { return s5_si(op(a.lo, b.lo), op(a.hi, b.hi)); }
S5_SI2(s5_and_si512, _mm256_and_si256)
S5_SI2(s5_or_si512, _mm256_or_si256)
S5_SI2(s5_xor_si512, _mm256_xor_si256)
S5_SI2(s5_add_epi32, _mm256_add_epi32)
S5_SI2(s5_sub_epi32, _mm256_sub_epi32)
S5_SI2(s5_mullo_epi32, _mm256_mullo_epi32)
S5_SI2(s5_add_epi16, _mm256_add_epi16)
#define S5_SHIFT(name, op)                                                                                      \
    S5 __m512i name(__m512i a, int n) { return s5_si(op(a.lo, n), op(a.hi, n)); }
S5_SHIFT(s5_slli_epi16, _mm256_slli_epi16)
S5_SHIFT(s5_srli_epi16, _mm256_srli_epi16)
S5_SHIFT(s5_slli_epi32, _mm256_slli_epi32)
S5_SHIFT(s5_srli_epi32, _mm256_srli_epi32)
S5_SHIFT(s5_srai_epi32, _mm256_srai_epi32)
S5 __m512i s5_srl_epi16(__m512i a, __m128i c) { return s5_si(_mm256_srl_epi16(a.lo, c), _mm256_srl_epi16(a.hi, c)); }
S5 __m512i s5_set1_epi32(int a) { return s5_si(_mm256_set1_epi32(a), _mm256_set1_epi32(a)); }
S5 __m512i s5_set1_epi16(short a) { return s5_si(_mm256_set1_epi16(a), _mm256_set1_epi16(a)); }
S5 __m512i s5_setzero_si512(void) { return s5_si(_mm256_setzero_si256(), _mm256_setzero_si256()); }
S5 __m512i s5_setr_epi32(int a0, int a1, int a2, int a3, int a4, int a5, int a6, int a7, int a8, int a9, int a10,
                         int a11, int a12, int a13, int a14, int a15) {
    return s5_si(_mm256_setr_epi32(a0, a1, a2, a3, a4, a5, a6, a7),
                 _mm256_setr_epi32(a8, a9, a10, a11, a12, a13, a14, a15));
}
/* 16-bit lanes shifted right each by its own count (zero past 15), through the two 32-bit halves of each pair */
S5 __m256i s5_srlv_epi16_half(__m256i a, __m256i c) {
    const __m256i lo16 = _mm256_set1_epi32(0xFFFF);
    __m256i even = _mm256_srlv_epi32(_mm256_and_si256(a, lo16), _mm256_and_si256(c, lo16));
    __m256i odd = _mm256_srlv_epi32(_mm256_andnot_si256(lo16, a), _mm256_srli_epi32(c, 16));
    return _mm256_or_si256(_mm256_and_si256(even, lo16), _mm256_andnot_si256(lo16, odd));
}
S5_SI2(s5_srlv_epi16, s5_srlv_epi16_half)
/* vpternlogd for the truth tables the kernels use, any other through its minterms */
S5 __m256i s5_ternary256(__m256i a, __m256i b, __m256i c, int imm) {
    switch (imm) {
    case 0xEA: return _mm256_or_si256(_mm256_and_si256(a, b), c);           /* (A & B) | C */
    case 0xBE: return _mm256_or_si256(_mm256_xor_si256(a, b), c);           /* (A ^ B) | C */
    case 0xA8: return _mm256_and_si256(_mm256_or_si256(a, b), c);           /* (A | B) & C */
    case 0xFE: return _mm256_or_si256(_mm256_or_si256(a, b), c);            /* A | B | C */
    case 0xF8: return _mm256_or_si256(a, _mm256_and_si256(b, c));           /* A | (B & C) */
    default: {
        __m256i r = _mm256_setzero_si256(), ones = _mm256_set1_epi32(-1);
        for (int i = 0; i < 8; i++)
            if (imm >> i & 1)
                r = _mm256_or_si256(r, _mm256_and_si256(_mm256_and_si256(i & 4 ? a : _mm256_xor_si256(a, ones),
                                                                         i & 2 ? b : _mm256_xor_si256(b, ones)),
                                                        i & 1 ? c : _mm256_xor_si256(c, ones)));
        return r;
    }
    }
}
S5 __m512i s5_ternary(__m512i a, __m512i b, __m512i c, int imm) {
    return s5_si(s5_ternary256(a.lo, b.lo, c.lo, imm), s5_ternary256(a.hi, b.hi, c.hi, imm));
}
S5 int s5_reduce_add_epi32(__m512i a) {
    __m256i s = _mm256_add_epi32(a.lo, a.hi);
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_unpackhi_epi64(t, t));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 1));
    return _mm_cvtsi128_si32(t);
}
S5 __mmask32 s5_test_epi16_mask(__m512i a, __m512i b) {
    const __m256i z = _mm256_setzero_si256(), ones = _mm256_set1_epi32(-1);
    __m256i lo = _mm256_xor_si256(_mm256_cmpeq_epi16(_mm256_and_si256(a.lo, b.lo), z), ones);
    __m256i hi = _mm256_xor_si256(_mm256_cmpeq_epi16(_mm256_and_si256(a.hi, b.hi), z), ones);
    return s5_bits16(s5_si(lo, hi));
}
/* unsigned 32-bit compares: both sides offset by 2^31, then signed */
S5 __m256i s5_gt_epu32(__m256i a, __m256i b) {
    const __m256i s = _mm256_set1_epi32((int)0x80000000u);
    return _mm256_cmpgt_epi32(_mm256_xor_si256(a, s), _mm256_xor_si256(b, s));
}
S5 __mmask16 s5_mask_cmplt_epu32(__mmask16 m, __m512i a, __m512i b) {
    return m & s5_bits32(s5_si(s5_gt_epu32(b.lo, a.lo), s5_gt_epu32(b.hi, a.hi)));
}
S5 __mmask16 s5_mask_cmpge_epu32(__mmask16 m, __m512i a, __m512i b) {
    return m & (__mmask16)~s5_bits32(s5_si(s5_gt_epu32(b.lo, a.lo), s5_gt_epu32(b.hi, a.hi)));
}
/* gathers of 32-bit lanes at byte offsets idx from base (the kernels' scale is 1) */
S5 __m512i s5_mask_i32gather_epi32(__m512i src, __mmask16 m, __m512i idx, const void *base) {
    __m512i k = s5_lanes32(m);
    return s5_si(_mm256_mask_i32gather_epi32(src.lo, (const int *)base, idx.lo, k.lo, 1),
                 _mm256_mask_i32gather_epi32(src.hi, (const int *)base, idx.hi, k.hi, 1));
}

/* ---------------------------------------------------------------- permutes */

/* out[i] = a[idx[i] & 15] for 8 lanes: both halves of a, picked by bit 3 of the index */
S5 __m256 s5_perm16_half(__m512 a, __m256i idx) {
    __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(a.lo, idx), _mm256_permutevar8x32_ps(a.hi, idx), sel);
}
S5 __m512 s5_permutexvar_ps(__m512i idx, __m512 a) {
    return s5_ps(s5_perm16_half(a, idx.lo), s5_perm16_half(a, idx.hi));
}
/* out[i] = (idx[i] & 16 ? b : a)[idx[i] & 15] */
S5 __m256 s5_perm32_half(__m512 a, __m512 b, __m256i idx) {
    __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27));
    return _mm256_blendv_ps(s5_perm16_half(a, idx), s5_perm16_half(b, idx), sel);
}
S5 __m512 s5_permutex2var_ps(__m512 a, __m512i idx, __m512 b) {
    return s5_ps(s5_perm32_half(a, b, idx.lo), s5_perm32_half(a, b, idx.hi));
}
/* 16-bit lanes from tables of 32 (one vector) or 64 (two) entries, lane by lane */
static inline __m512i s5_permutexvar_epi16(__m512i idx, __m512i a) {
    uint16_t t[32], i16[32], r[32];
    s5_storeu_si512(t, a);
    s5_storeu_si512(i16, idx);
    for (int i = 0; i < 32; i++) r[i] = t[i16[i] & 31];
    return s5_loadu_si512(r);
}
static inline __m512i s5_permutex2var_epi16(__m512i a, __m512i idx, __m512i b) {
    uint16_t t[64], i16[32], r[32];
    s5_storeu_si512(t, a);
    s5_storeu_si512(t + 32, b);
    s5_storeu_si512(i16, idx);
    for (int i = 0; i < 32; i++) r[i] = t[i16[i] & 63];
    return s5_loadu_si512(r);
}
S5 __m512 s5_broadcast_f32x4(__m128 a) {
    __m256 h = _mm256_set_m128(a, a);
    return s5_ps(h, h);
}

/* ---------------------------------------------------------------- sums of 16 vectors (sum16 in quant_cpu.h) */

/* lane i of the result: the sum of the 8 lanes of a[i], added as s5_reduce_add_ps adds them (j + 4, j + 2, j + 1),
 * through one transpose tree */
S5 __m256 s5_sum8(const __m256 a[8]) {
    __m256 c[4], d[2];
    for (int i = 0; i < 4; i++) /* [key 2i: 4 partials | key 2i + 1: 4 partials] */
        c[i] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x20),
                             _mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x31));
    for (int i = 0; i < 2; i++) /* [keys 4i, 4i + 2: 2 partials each | keys 4i + 1, 4i + 3] */
        d[i] = _mm256_add_ps(_mm256_shuffle_ps(c[2 * i], c[2 * i + 1], 0x44),
                             _mm256_shuffle_ps(c[2 * i], c[2 * i + 1], 0xEE));
    __m256 e = _mm256_add_ps(_mm256_shuffle_ps(d[0], d[1], 0x88), _mm256_shuffle_ps(d[0], d[1], 0xDD));
    return _mm256_permutevar8x32_ps(e, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)); /* keys 0, 2, 4, 6 | 1, 3, 5, 7 */
}
/* lane i: the full sum of v[i], lane j + 8 added to lane j first: the sums of _mm512_reduce_add_ps */
S5 __m512 s5_sum16(const __m512 v[16]) {
    __m256 lo[8], hi[8];
    for (int i = 0; i < 8; i++) {
        lo[i] = _mm256_add_ps(v[i].lo, v[i].hi);
        hi[i] = _mm256_add_ps(v[8 + i].lo, v[8 + i].hi);
    }
    return s5_ps(s5_sum8(lo), s5_sum8(hi));
}

/* ---------------------------------------------------------------- the AVX-512 names */
/* (each #undef: GCC's headers define some of these names as macros) */

#undef _mm512_loadu_ps
#define _mm512_loadu_ps s5_loadu_ps
#undef _mm512_storeu_ps
#define _mm512_storeu_ps s5_storeu_ps
#undef _mm512_loadu_si512
#define _mm512_loadu_si512 s5_loadu_si512
#undef _mm512_storeu_si512
#define _mm512_storeu_si512 s5_storeu_si512
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps s5_maskz_loadu_ps
#undef _mm512_mask_loadu_ps
#define _mm512_mask_loadu_ps s5_mask_loadu_ps
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps s5_mask_storeu_ps
#undef _mm256_mask_storeu_ps
#define _mm256_mask_storeu_ps s5_mask_storeu_ps256
#undef _mm512_maskz_loadu_epi16
#define _mm512_maskz_loadu_epi16 s5_maskz_loadu_epi16
#undef _mm256_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi16 s5_maskz_loadu_epi16_256
#undef _mm256_maskz_loadu_epi8
#define _mm256_maskz_loadu_epi8 s5_maskz_loadu_epi8_256
#undef _mm_maskz_loadu_epi8
#define _mm_maskz_loadu_epi8 s5_maskz_loadu_epi8_128
#undef _mm256_mask_storeu_epi16
#define _mm256_mask_storeu_epi16 s5_mask_storeu_epi16_256
#undef _mm512_mask_compressstoreu_epi32
#define _mm512_mask_compressstoreu_epi32 s5_mask_compressstoreu_32
#undef _mm512_mask_compressstoreu_ps
#define _mm512_mask_compressstoreu_ps(p, m, v) s5_mask_compressstoreu_32((p), (m), _mm512_castps_si512(v))

#undef _mm512_set1_ps
#define _mm512_set1_ps s5_set1_ps
#undef _mm512_setzero_ps
#define _mm512_setzero_ps s5_setzero_ps
#undef _mm512_setzero_pd
#define _mm512_setzero_pd s5_setzero_pd
#undef _mm512_setzero_si512
#define _mm512_setzero_si512 s5_setzero_si512
#undef _mm512_setr_ps
#define _mm512_setr_ps s5_setr_ps
#undef _mm512_setr_epi32
#define _mm512_setr_epi32 s5_setr_epi32
#undef _mm512_add_ps
#define _mm512_add_ps s5_add_ps
#undef _mm512_sub_ps
#define _mm512_sub_ps s5_sub_ps
#undef _mm512_mul_ps
#define _mm512_mul_ps s5_mul_ps
#undef _mm512_div_ps
#define _mm512_div_ps s5_div_ps
#undef _mm512_add_pd
#define _mm512_add_pd s5_add_pd
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps s5_fmadd_ps
#undef _mm512_fnmadd_ps
#define _mm512_fnmadd_ps s5_fnmadd_ps
#undef _mm512_max_ps
#define _mm512_max_ps s5_max_ps
#undef _mm512_min_ps
#define _mm512_min_ps s5_min_ps
#undef _mm512_abs_ps
#define _mm512_abs_ps s5_abs_ps
#undef _mm512_mask_mov_ps
#define _mm512_mask_mov_ps s5_blend_ps
#undef _mm512_maskz_mov_ps
#define _mm512_maskz_mov_ps s5_maskz_mov_ps
#undef _mm512_mask_max_ps
#define _mm512_mask_max_ps s5_mask_max_ps
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps s5_reduce_add_ps
#undef _mm512_reduce_max_ps
#define _mm512_reduce_max_ps s5_reduce_max_ps
#undef _mm512_mask_reduce_max_ps
#define _mm512_mask_reduce_max_ps s5_mask_reduce_max_ps
#undef _mm512_reduce_add_pd
#define _mm512_reduce_add_pd s5_reduce_add_pd
#undef _mm512_roundscale_ps
#define _mm512_roundscale_ps(a, imm) s5_round_nearest(a) /* the kernels round to nearest only */
#undef _mm512_scalef_ps
#define _mm512_scalef_ps s5_scalef_ps
#undef _mm512_mask_cmp_ps_mask
#define _mm512_mask_cmp_ps_mask s5_mask_cmp_ps_mask
#undef _mm512_mask_fpclass_ps_mask
#define _mm512_mask_fpclass_ps_mask(m, a, imm) s5_fpclass_nonfinite((m), (a)) /* the kernels ask 0x99 only */

#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps s5_cvtepi32_ps
#undef _mm512_cvtps_epi32
#define _mm512_cvtps_epi32 s5_cvtps_epi32
#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps s5_cvtph_ps
#undef _mm512_cvtps_pd
#define _mm512_cvtps_pd s5_cvtps_pd
#undef _mm512_cvtepu8_epi16
#define _mm512_cvtepu8_epi16 s5_cvtepu8_epi16
#undef _mm512_cvtepu8_epi32
#define _mm512_cvtepu8_epi32 s5_cvtepu8_epi32
#undef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32 s5_cvtepi8_epi32
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32 s5_cvtepu16_epi32
#undef _mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi16 s5_cvtepi32_epi16
#undef _mm512_cvtneps_pbh
#define _mm512_cvtneps_pbh s5_cvtneps_bf16 /* a __m256i: the kernels cast it so */
#undef _mm512_dpbf16_ps
#define _mm512_dpbf16_ps s5_dpbf16_ps

#undef _mm512_castps512_ps256
#define _mm512_castps512_ps256(v) ((v).lo)
#undef _mm512_extractf32x8_ps
#define _mm512_extractf32x8_ps(v, imm) ((imm) ? (v).hi : (v).lo)
#undef _mm512_extractf64x4_pd
#define _mm512_extractf64x4_pd(v, imm) ((imm) ? (v).hi : (v).lo)
#undef _mm512_extracti64x4_epi64
#define _mm512_extracti64x4_epi64(v, imm) ((imm) ? (v).hi : (v).lo)
#undef _mm512_castsi512_si256
#define _mm512_castsi512_si256(v) ((v).lo)
#undef _mm512_castsi256_si512
#define _mm512_castsi256_si512(a) s5_si((a), _mm256_setzero_si256())
#undef _mm512_inserti64x4
#define _mm512_inserti64x4(v, a, imm) ((imm) ? s5_si((v).lo, (a)) : s5_si((a), (v).hi))
S5 __m512i _mm512_castps_si512_s5(__m512 a) { return s5_si(_mm256_castps_si256(a.lo), _mm256_castps_si256(a.hi)); }
S5 __m512 _mm512_castsi512_ps_s5(__m512i a) { return s5_ps(_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)); }
S5 __m512d _mm512_castps_pd_s5(__m512 a) { return (__m512d){_mm256_castps_pd(a.lo), _mm256_castps_pd(a.hi)}; }
#undef _mm512_castps_si512
#define _mm512_castps_si512 _mm512_castps_si512_s5
#undef _mm512_castsi512_ps
#define _mm512_castsi512_ps _mm512_castsi512_ps_s5
#undef _mm512_castps_pd
#define _mm512_castps_pd _mm512_castps_pd_s5
#undef _mm512_broadcast_f32x4
#define _mm512_broadcast_f32x4 s5_broadcast_f32x4

#undef _mm512_set1_epi32
#define _mm512_set1_epi32 s5_set1_epi32
#undef _mm512_set1_epi16
#define _mm512_set1_epi16 s5_set1_epi16
#undef _mm512_and_si512
#define _mm512_and_si512 s5_and_si512
#undef _mm512_or_si512
#define _mm512_or_si512 s5_or_si512
#undef _mm512_xor_si512
#define _mm512_xor_si512 s5_xor_si512
#undef _mm512_add_epi32
#define _mm512_add_epi32 s5_add_epi32
#undef _mm512_sub_epi32
#define _mm512_sub_epi32 s5_sub_epi32
#undef _mm512_mullo_epi32
#define _mm512_mullo_epi32 s5_mullo_epi32
#undef _mm512_slli_epi16
#define _mm512_slli_epi16 s5_slli_epi16
#undef _mm512_srli_epi16
#define _mm512_srli_epi16 s5_srli_epi16
#undef _mm512_slli_epi32
#define _mm512_slli_epi32 s5_slli_epi32
#undef _mm512_srli_epi32
#define _mm512_srli_epi32 s5_srli_epi32
#undef _mm512_srai_epi32
#define _mm512_srai_epi32 s5_srai_epi32
#undef _mm512_srl_epi16
#define _mm512_srl_epi16 s5_srl_epi16
#undef _mm512_srlv_epi16
#define _mm512_srlv_epi16 s5_srlv_epi16
#undef _mm512_ternarylogic_epi32
#define _mm512_ternarylogic_epi32 s5_ternary
#undef _mm256_ternarylogic_epi32
#define _mm256_ternarylogic_epi32 s5_ternary256
#undef _mm512_reduce_add_epi32
#define _mm512_reduce_add_epi32 s5_reduce_add_epi32
#undef _mm512_test_epi16_mask
#define _mm512_test_epi16_mask s5_test_epi16_mask
#undef _mm512_mask_cmpge_epu32_mask
#define _mm512_mask_cmpge_epu32_mask s5_mask_cmpge_epu32
#undef _mm512_mask_cmplt_epu32_mask
#define _mm512_mask_cmplt_epu32_mask s5_mask_cmplt_epu32
#undef _mm512_mask_mov_epi32
#define _mm512_mask_mov_epi32 s5_blend32
#undef _mm512_mask_or_epi32
#define _mm512_mask_or_epi32(src, m, a, b) s5_blend32((src), (m), s5_or_si512((a), (b)))
#undef _mm512_mask_add_epi16
#define _mm512_mask_add_epi16(src, m, a, b) s5_blend16((src), (m), s5_add_epi16((a), (b)))
#undef _mm512_mask_blend_epi16
#define _mm512_mask_blend_epi16(m, a, b) s5_blend16((a), (m), (b))
#undef _mm512_mask_i32gather_epi32
#define _mm512_mask_i32gather_epi32(src, m, idx, base, scale) s5_mask_i32gather_epi32((src), (m), (idx), (base))
#undef _mm512_permutexvar_ps
#define _mm512_permutexvar_ps s5_permutexvar_ps
#undef _mm512_permutex2var_ps
#define _mm512_permutex2var_ps s5_permutex2var_ps
#undef _mm512_permutexvar_epi16
#define _mm512_permutexvar_epi16 s5_permutexvar_epi16
#undef _mm512_permutex2var_epi16
#define _mm512_permutex2var_epi16 s5_permutex2var_epi16

#endif
