/* AVX2 stand-ins for the AVX-512 intrinsics that Strata's kernels use, so that the same kernel sources build and
 * run on CPUs with AVX2, FMA and F16C but no AVX-512 (most client CPUs, AMD before Zen 4). quant_cpu.h includes
 * this header when the library is compiled without -mavx512f (quant_native.py picks the flags from the CPU).
 *
 * GCC defines the 512-bit vector types (__m512, __m512i, __m512bh, __m512d) and the mask types whatever the
 * target: they are generic vectors that it lowers to pairs of 256-bit registers. Only the intrinsic functions
 * need the AVX-512 target; each one used is redefined below, by a macro, as a function of the same meaning on
 * two 256-bit halves (or, for the few that have no AVX2 counterpart and sit off the decode path, lane by lane).
 * Results are the AVX-512 ones bit for bit, but for the sums: _mm512_dpbf16_ps adds its two products per lane
 * with two fused multiply-adds. Masked loads never touch memory outside the mask, as in AVX-512.
 */
#ifndef STRATA_QUANT_CPU_AVX2_H
#define STRATA_QUANT_CPU_AVX2_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define S5 static inline __attribute__((always_inline))

typedef float s5_v16f __attribute__((vector_size(64)));
typedef int s5_v16i __attribute__((vector_size(64)));
typedef unsigned s5_v16u __attribute__((vector_size(64)));
typedef short s5_v32h __attribute__((vector_size(64)));
typedef unsigned short s5_v32hu __attribute__((vector_size(64)));
typedef int s5_v8i __attribute__((vector_size(32)));
typedef unsigned short s5_v16hu __attribute__((vector_size(32)));
typedef short s5_v16h __attribute__((vector_size(32)));

/* ---------------------------------------------------------------- halves */

S5 __m256 s5_lo(__m512 v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7); }
S5 __m256 s5_hi(__m512 v) { return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15); }
S5 __m512 s5_join(__m256 lo, __m256 hi) {
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
S5 __m256i s5_lo_i(__m512i v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3); }
S5 __m256i s5_hi_i(__m512i v) { return __builtin_shufflevector(v, v, 4, 5, 6, 7); }
S5 __m512i s5_join_i(__m256i lo, __m256i hi) { return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7); }
S5 __m256d s5_lo_d(__m512d v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3); }
S5 __m256d s5_hi_d(__m512d v) { return __builtin_shufflevector(v, v, 4, 5, 6, 7); }
S5 __m512d s5_join_d(__m256d lo, __m256d hi) { return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7); }

/* ---------------------------------------------------------------- masks <-> lanes */

/* lane i all ones where bit i of m is set: 16 lanes of 32 bits, 32 lanes of 16 bits */
S5 __m512i s5_lanes32(unsigned m) {
    const s5_v16i bit = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768};
    return (__m512i)(((s5_v16i){} + (int)m & bit) != 0);
}
S5 __m512i s5_lanes16(unsigned m) {
    const s5_v16i bit = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768};
    s5_v16i lo = ((s5_v16i){} + (int)(m & 0xFFFF) & bit) != 0, hi = ((s5_v16i){} + (int)(m >> 16) & bit) != 0;
    return (__m512i)__builtin_convertvector(__builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                                    12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
                                                                    24, 25, 26, 27, 28, 29, 30, 31),
                                            s5_v32h);
}
S5 __m256i s5_lanes32_8(unsigned m) { return s5_lo_i(s5_lanes32(m & 0xFF)); }
/* bit i set where lane i (32 bits) has its top bit set */
S5 __mmask16 s5_bits32(__m512i v) {
    return (__mmask16)(_mm256_movemask_ps((__m256)s5_lo_i(v)) | _mm256_movemask_ps((__m256)s5_hi_i(v)) << 8);
}
/* the same for 32 lanes of 16 bits (each all ones or all zeros) */
S5 __mmask32 s5_bits16(__m512i v) {
    __m256i b = _mm256_permute4x64_epi64(_mm256_packs_epi16(s5_lo_i(v), s5_hi_i(v)), 0xD8);
    return (__mmask32)_mm256_movemask_epi8(b);
}
S5 __m512 s5_blend_ps(__m512 src, __mmask16 m, __m512 a) {
    return m == 0xFFFF ? a : (__m512)(((__m512i)a & s5_lanes32(m)) | ((__m512i)src & ~s5_lanes32(m)));
}
S5 __m512i s5_blend32(__m512i src, __mmask16 m, __m512i a) {
    return (a & s5_lanes32(m)) | (src & ~s5_lanes32(m));
}
S5 __m512i s5_blend16(__m512i src, __mmask32 m, __m512i a) {
    return (a & s5_lanes16(m)) | (src & ~s5_lanes16(m));
}

/* ---------------------------------------------------------------- loads and stores */

S5 __m512 s5_loadu_ps(const void *p) {
    __m512 v;
    memcpy(&v, p, 64);
    return v;
}
S5 void s5_storeu_ps(void *p, __m512 v) { memcpy(p, &v, 64); }
S5 __m512i s5_loadu_si512(const void *p) {
    __m512i v;
    memcpy(&v, p, 64);
    return v;
}
S5 void s5_storeu_si512(void *p, __m512i v) { memcpy(p, &v, 64); }
S5 __m512 s5_maskz_loadu_ps(__mmask16 m, const void *p) {
    if (m == 0xFFFF) return s5_loadu_ps(p);
    const float *f = (const float *)p;
    __m512i k = s5_lanes32(m);
    return s5_join(_mm256_maskload_ps(f, s5_lo_i(k)), _mm256_maskload_ps(f + 8, s5_hi_i(k)));
}
S5 __m512 s5_mask_loadu_ps(__m512 src, __mmask16 m, const void *p) {
    return s5_blend_ps(src, m, s5_maskz_loadu_ps(m, p));
}
S5 void s5_mask_storeu_ps(void *p, __mmask16 m, __m512 v) {
    if (m == 0xFFFF) {
        s5_storeu_ps(p, v);
        return;
    }
    float *f = (float *)p;
    __m512i k = s5_lanes32(m);
    _mm256_maskstore_ps(f, s5_lo_i(k), s5_lo(v));
    _mm256_maskstore_ps(f + 8, s5_hi_i(k), s5_hi(v));
}
S5 void s5_mask_storeu_ps256(void *p, __mmask8 m, __m256 v) { _mm256_maskstore_ps((float *)p, s5_lanes32_8(m), v); }
/* n-byte lanes with no AVX2 masked form: the lanes in m through a zeroed buffer */
S5 void s5_maskz_copy(void *dst, const void *src, uint64_t m, int lanes, int size) {
    memset(dst, 0, (size_t)lanes * size);
    for (int i = 0; i < lanes; i++)
        if (m >> i & 1) memcpy((char *)dst + i * size, (const char *)src + i * size, size);
}
S5 __m512i s5_maskz_loadu_epi16(__mmask32 m, const void *p) {
    if (m == 0xFFFFFFFFu) return s5_loadu_si512(p);
    __m512i v;
    s5_maskz_copy(&v, p, m, 32, 2);
    return v;
}
S5 __m256i s5_maskz_loadu_epi16_256(__mmask16 m, const void *p) {
    __m256i v;
    if (m == 0xFFFF) memcpy(&v, p, 32);
    else s5_maskz_copy(&v, p, m, 16, 2);
    return v;
}
S5 __m256i s5_maskz_loadu_epi8_256(__mmask32 m, const void *p) {
    __m256i v;
    if (m == 0xFFFFFFFFu) memcpy(&v, p, 32);
    else s5_maskz_copy(&v, p, m, 32, 1);
    return v;
}
S5 __m128i s5_maskz_loadu_epi8_128(__mmask16 m, const void *p) {
    __m128i v;
    if (m == 0xFFFF) memcpy(&v, p, 16);
    else s5_maskz_copy(&v, p, m, 16, 1);
    return v;
}
S5 void s5_mask_storeu_epi16_256(void *p, __mmask16 m, __m256i v) {
    if (m == 0xFFFF) {
        memcpy(p, &v, 32);
        return;
    }
    for (int i = 0; i < 16; i++)
        if (m >> i & 1) memcpy((char *)p + 2 * i, (const char *)&v + 2 * i, 2);
}
S5 void s5_mask_compressstoreu_32(void *p, __mmask16 m, __m512i v) {
    int32_t lane[16], n = 0;
    memcpy(lane, &v, 64);
    for (int i = 0; i < 16; i++)
        if (m >> i & 1) memcpy((char *)p + 4 * n++, &lane[i], 4);
}

/* ---------------------------------------------------------------- float arithmetic */

S5 __m512 s5_set1_ps(float a) { return (__m512){} + a; }
S5 __m512 s5_setzero_ps(void) { return (__m512){}; }
S5 __m512 s5_fmadd_ps(__m512 a, __m512 b, __m512 c) {
    return s5_join(_mm256_fmadd_ps(s5_lo(a), s5_lo(b), s5_lo(c)), _mm256_fmadd_ps(s5_hi(a), s5_hi(b), s5_hi(c)));
}
S5 __m512 s5_fnmadd_ps(__m512 a, __m512 b, __m512 c) {
    return s5_join(_mm256_fnmadd_ps(s5_lo(a), s5_lo(b), s5_lo(c)), _mm256_fnmadd_ps(s5_hi(a), s5_hi(b), s5_hi(c)));
}
S5 __m512 s5_max_ps(__m512 a, __m512 b) { /* NaN handling of vmaxps: b when either is NaN */
    return s5_join(_mm256_max_ps(s5_lo(a), s5_lo(b)), _mm256_max_ps(s5_hi(a), s5_hi(b)));
}
S5 __m512 s5_min_ps(__m512 a, __m512 b) {
    return s5_join(_mm256_min_ps(s5_lo(a), s5_lo(b)), _mm256_min_ps(s5_hi(a), s5_hi(b)));
}
S5 __m512 s5_abs_ps(__m512 a) { return (__m512)((__m512i)a & (__m512i)((s5_v16i){} + 0x7FFFFFFF)); }
S5 __m512 s5_mask_mov_ps(__m512 src, __mmask16 m, __m512 a) { return s5_blend_ps(src, m, a); }
S5 __m512 s5_maskz_mov_ps(__mmask16 m, __m512 a) { return s5_blend_ps((__m512){}, m, a); }
S5 __m512 s5_mask_max_ps(__m512 src, __mmask16 m, __m512 a, __m512 b) { return s5_blend_ps(src, m, s5_max_ps(a, b)); }
/* lane j + 8, then j + 4, j + 2, j + 1: the order of _mm512_reduce_add_ps */
S5 float s5_reduce_add_ps(__m512 v) {
    __m256 a = _mm256_add_ps(s5_lo(v), s5_hi(v));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    b = _mm_add_ss(b, _mm_movehdup_ps(b));
    return _mm_cvtss_f32(b);
}
S5 float s5_reduce_max_ps(__m512 v) {
    __m256 a = _mm256_max_ps(s5_lo(v), s5_hi(v));
    __m128 b = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_max_ps(b, _mm_movehl_ps(b, b));
    b = _mm_max_ss(b, _mm_movehdup_ps(b));
    return _mm_cvtss_f32(b);
}
S5 float s5_mask_reduce_max_ps(__mmask16 m, __m512 v) {
    return s5_reduce_max_ps(s5_blend_ps(s5_set1_ps(-__builtin_inff()), m, v));
}
S5 double s5_reduce_add_pd(__m512d v) {
    __m256d a = _mm256_add_pd(s5_lo_d(v), s5_hi_d(v));
    __m128d b = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    return _mm_cvtsd_f64(_mm_add_sd(b, _mm_unpackhi_pd(b, b)));
}
S5 __m512 s5_roundscale_nearest(__m512 a) {
    return s5_join(_mm256_round_ps(s5_lo(a), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                   _mm256_round_ps(s5_hi(a), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
/* a * 2^b for integral b in [-126, 127] (exp_ps's range) */
S5 __m512 s5_scalef_ps(__m512 a, __m512 b) {
    s5_v16i e = __builtin_convertvector(b, s5_v16i);
    return a * (__m512)((e + 127) << 23);
}
/* lane compares under a mask; a NaN compares as the predicate's unordered case, as vcmpps */
#define s5_mask_cmp_ps_mask(m, a, b, pred)                                                                      \
    ((__mmask16)((m) & (_mm256_movemask_ps(_mm256_cmp_ps(s5_lo(a), s5_lo(b), (pred))) |                        \
                        _mm256_movemask_ps(_mm256_cmp_ps(s5_hi(a), s5_hi(b), (pred))) << 8)))
/* fpclass 0x99 (QNaN, SNaN, +inf, -inf): the lanes that are not finite */
S5 __mmask16 s5_fpclass_nonfinite(__mmask16 m, __m512 a) {
    __m512 inf = s5_set1_ps(__builtin_inff()), x = s5_abs_ps(a);
    return s5_mask_cmp_ps_mask(m, x, inf, _CMP_NLT_UQ);
}

/* ---------------------------------------------------------------- conversions */

S5 __m512 s5_cvtepi32_ps(__m512i a) { return __builtin_convertvector((s5_v16i)a, __m512); }
S5 __m512i s5_cvtps_epi32(__m512 a) { /* rounds to nearest even, as vcvtps2dq */
    return s5_join_i(_mm256_cvtps_epi32(s5_lo(a)), _mm256_cvtps_epi32(s5_hi(a)));
}
S5 __m512 s5_cvtph_ps(__m256i h) {
    return s5_join(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)));
}
S5 __m512d s5_cvtps_pd(__m256 a) {
    return s5_join_d(_mm256_cvtps_pd(_mm256_castps256_ps128(a)), _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
}
S5 __m512i s5_cvtepu8_epi16(__m256i a) {
    return s5_join_i(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(a)), _mm256_cvtepu8_epi16(_mm256_extracti128_si256(a, 1)));
}
S5 __m512i s5_cvtepu8_epi32(__m128i a) {
    return s5_join_i(_mm256_cvtepu8_epi32(a), _mm256_cvtepu8_epi32(_mm_srli_si128(a, 8)));
}
S5 __m512i s5_cvtepi8_epi32(__m128i a) {
    return s5_join_i(_mm256_cvtepi8_epi32(a), _mm256_cvtepi8_epi32(_mm_srli_si128(a, 8)));
}
S5 __m512i s5_cvtepu16_epi32(__m256i a) {
    return s5_join_i(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(a)),
                     _mm256_cvtepu16_epi32(_mm256_extracti128_si256(a, 1)));
}
S5 __m256i s5_cvtepi32_epi16(__m512i a) { return (__m256i)__builtin_convertvector((s5_v16i)a, s5_v16h); }
/* fp32 -> bf16, round to nearest even, NaN kept a (quiet) NaN: vcvtneps2bf16 */
S5 __m256i s5_cvtneps_bf16(__m512 a) {
    s5_v16u u = (s5_v16u)a;
    s5_v16u r = (u + 0x7FFFu + (u >> 16 & 1u)) >> 16;
    s5_v16u nan = (s5_v16u)(a != a);
    r = (r & ~nan) | ((u >> 16 | 0x40u) & nan);
    return (__m256i)__builtin_convertvector(r, s5_v16hu);
}
/* acc[i] += a[2i+1] * b[2i+1] + a[2i] * b[2i] (bf16 pairs): vdpbf16ps as two fused multiply-adds */
S5 __m512 s5_dpbf16_ps(__m512 acc, __m512i a, __m512i b) {
    const __m512i hi = (__m512i)((s5_v16u){} + 0xFFFF0000u);
    __m512 ao = (__m512)(a & hi), bo = (__m512)(b & hi);
    __m512 ae = (__m512)((s5_v16u)a << 16), be = (__m512)((s5_v16u)b << 16);
    return s5_fmadd_ps(ae, be, s5_fmadd_ps(ao, bo, acc));
}

/* ---------------------------------------------------------------- integer lanes */

S5 __m512i s5_set1_epi32(int a) { return (__m512i)((s5_v16i){} + a); }
S5 __m512i s5_set1_epi16(short a) { return (__m512i)((s5_v32h){} + a); }
S5 __m512i s5_mullo_epi32(__m512i a, __m512i b) { return (__m512i)((s5_v16i)a * (s5_v16i)b); }
S5 __m512i s5_srl_epi16(__m512i a, __m128i c) {
    long long n = _mm_cvtsi128_si64(c);
    return n > 15 ? (__m512i){} : (__m512i)((s5_v32hu)a >> (int)n);
}
S5 __m512i s5_srlv_epi16(__m512i a, __m512i c) {
    s5_v32hu n = (s5_v32hu)c;
    return (__m512i)(((s5_v32hu)a >> (n & 15)) & ~(s5_v32hu)(n > 15));
}
S5 __m512i s5_ternary(__m512i a, __m512i b, __m512i c, int imm) {
    switch (imm) {
    case 0xEA: return (a & b) | c;
    case 0xBE: return (a ^ b) | c;
    case 0xA8: return (a | b) & c;
    case 0xFE: return a | b | c;
    case 0xF8: return a | (b & c);
    default: {
        __m512i r = {};
        for (int i = 0; i < 8; i++)
            if (imm >> i & 1) r |= (i & 4 ? a : ~a) & (i & 2 ? b : ~b) & (i & 1 ? c : ~c);
        return r;
    }
    }
}
S5 __m256i s5_ternary256(__m256i a, __m256i b, __m256i c, int imm) {
    return s5_lo_i(s5_ternary(s5_join_i(a, a), s5_join_i(b, b), s5_join_i(c, c), imm));
}
S5 int s5_reduce_add_epi32(__m512i a) {
    __m256i s = _mm256_add_epi32(s5_lo_i(a), s5_hi_i(a));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_unpackhi_epi64(t, t));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 1));
    return _mm_cvtsi128_si32(t);
}
S5 __mmask32 s5_test_epi16_mask(__m512i a, __m512i b) { return s5_bits16((__m512i)(((s5_v32h)(a & b)) != 0)); }
S5 __mmask16 s5_mask_cmpge_epu32(__mmask16 m, __m512i a, __m512i b) {
    return m & s5_bits32((__m512i)((s5_v16u)a >= (s5_v16u)b));
}
S5 __mmask16 s5_mask_cmplt_epu32(__mmask16 m, __m512i a, __m512i b) {
    return m & s5_bits32((__m512i)((s5_v16u)a < (s5_v16u)b));
}
/* gathers of 32-bit lanes at byte offsets idx from base (the kernels' scale is 1) */
S5 __m512i s5_mask_i32gather_epi32(__m512i src, __mmask16 m, __m512i idx, const void *base) {
    __m512i k = s5_lanes32(m);
    return s5_join_i(_mm256_mask_i32gather_epi32(s5_lo_i(src), (const int *)base, s5_lo_i(idx), s5_lo_i(k), 1),
                     _mm256_mask_i32gather_epi32(s5_hi_i(src), (const int *)base, s5_hi_i(idx), s5_hi_i(k), 1));
}

/* ---------------------------------------------------------------- permutes */

/* out[i] = a[idx[i] & 15]: each half from both halves of a, picked by bit 3 of the index */
S5 __m256 s5_perm16_half(__m256 lo, __m256 hi, __m256i idx) {
    __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), sel);
}
S5 __m512 s5_permutexvar_ps(__m512i idx, __m512 a) {
    return s5_join(s5_perm16_half(s5_lo(a), s5_hi(a), s5_lo_i(idx)), s5_perm16_half(s5_lo(a), s5_hi(a), s5_hi_i(idx)));
}
/* out[i] = (idx[i] & 16 ? b : a)[idx[i] & 15] */
S5 __m256 s5_perm32_half(__m512 a, __m512 b, __m256i idx) {
    __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27));
    return _mm256_blendv_ps(s5_perm16_half(s5_lo(a), s5_hi(a), idx), s5_perm16_half(s5_lo(b), s5_hi(b), idx), sel);
}
S5 __m512 s5_permutex2var_ps(__m512 a, __m512i idx, __m512 b) {
    return s5_join(s5_perm32_half(a, b, s5_lo_i(idx)), s5_perm32_half(a, b, s5_hi_i(idx)));
}
/* 16-bit lanes from tables of 32 (one vector) or 64 (two) entries, lane by lane */
S5 __m512i s5_permutexvar_epi16(__m512i idx, __m512i a) {
    uint16_t t[32], i16[32], r[32];
    memcpy(t, &a, 64);
    memcpy(i16, &idx, 64);
    for (int i = 0; i < 32; i++) r[i] = t[i16[i] & 31];
    return s5_loadu_si512(r);
}
S5 __m512i s5_permutex2var_epi16(__m512i a, __m512i idx, __m512i b) {
    uint16_t t[64], i16[32], r[32];
    memcpy(t, &a, 64);
    memcpy(t + 32, &b, 64);
    memcpy(i16, &idx, 64);
    for (int i = 0; i < 32; i++) r[i] = t[i16[i] & 63];
    return s5_loadu_si512(r);
}
S5 __m512 s5_broadcast_f32x4(__m128 a) {
    __m256 h = _mm256_set_m128(a, a);
    return s5_join(h, h);
}

/* ---------------------------------------------------------------- plain lane arithmetic */

S5 __m512 s5_add_ps(__m512 a, __m512 b) { return a + b; }
S5 __m512 s5_sub_ps(__m512 a, __m512 b) { return a - b; }
S5 __m512 s5_mul_ps(__m512 a, __m512 b) { return a * b; }
S5 __m512 s5_div_ps(__m512 a, __m512 b) { return a / b; }
S5 __m512d s5_add_pd(__m512d a, __m512d b) { return a + b; }
S5 __m512i s5_and_si512(__m512i a, __m512i b) { return a & b; }
S5 __m512i s5_or_si512(__m512i a, __m512i b) { return a | b; }
S5 __m512i s5_xor_si512(__m512i a, __m512i b) { return a ^ b; }
S5 __m512i s5_add_epi32(__m512i a, __m512i b) { return (__m512i)((s5_v16i)a + (s5_v16i)b); }
S5 __m512i s5_sub_epi32(__m512i a, __m512i b) { return (__m512i)((s5_v16i)a - (s5_v16i)b); }
S5 __m512i s5_slli_epi16(__m512i a, int n) { return (__m512i)((s5_v32hu)a << n); }
S5 __m512i s5_srli_epi16(__m512i a, int n) { return (__m512i)((s5_v32hu)a >> n); }
S5 __m512i s5_slli_epi32(__m512i a, int n) { return (__m512i)((s5_v16u)a << n); }
S5 __m512i s5_srli_epi32(__m512i a, int n) { return (__m512i)((s5_v16u)a >> n); }
S5 __m512i s5_srai_epi32(__m512i a, int n) { return (__m512i)((s5_v16i)a >> n); }
S5 __m512i s5_castps_si512(__m512 a) { return (__m512i)a; }
S5 __m512 s5_castsi512_ps(__m512i a) { return (__m512)a; }
S5 __m512d s5_castps_pd(__m512 a) { return (__m512d)a; }

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
#define _mm512_mask_compressstoreu_epi32(p, m, v) s5_mask_compressstoreu_32((p), (m), (v))
#undef _mm512_mask_compressstoreu_ps
#define _mm512_mask_compressstoreu_ps(p, m, v) s5_mask_compressstoreu_32((p), (m), (__m512i)(v))

#undef _mm512_set1_ps
#define _mm512_set1_ps s5_set1_ps
#undef _mm512_setzero_ps
#define _mm512_setzero_ps s5_setzero_ps
#undef _mm512_setzero_pd
#define _mm512_setzero_pd() ((__m512d){})
#undef _mm512_setzero_si512
#define _mm512_setzero_si512() ((__m512i){})
#undef _mm512_setr_ps
#define _mm512_setr_ps(...) ((__m512){__VA_ARGS__})
#undef _mm512_setr_epi32
#define _mm512_setr_epi32(...) ((__m512i)(s5_v16i){__VA_ARGS__})
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
#define _mm512_mask_mov_ps s5_mask_mov_ps
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
#define _mm512_roundscale_ps(a, imm) s5_roundscale_nearest(a) /* the kernels round to nearest only */
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
#define _mm512_cvtneps_pbh(a) ((__m256bh)s5_cvtneps_bf16(a))
#undef _mm512_dpbf16_ps
#define _mm512_dpbf16_ps(acc, a, b) s5_dpbf16_ps((acc), (__m512i)(a), (__m512i)(b))

#undef _mm512_castps512_ps256
#define _mm512_castps512_ps256 s5_lo
#undef _mm512_extractf32x8_ps
#define _mm512_extractf32x8_ps(v, imm) ((imm) ? s5_hi(v) : s5_lo(v))
#undef _mm512_extractf64x4_pd
#define _mm512_extractf64x4_pd(v, imm) ((imm) ? s5_hi_d(v) : s5_lo_d(v))
#undef _mm512_extracti64x4_epi64
#define _mm512_extracti64x4_epi64(v, imm) ((imm) ? s5_hi_i(v) : s5_lo_i(v))
#undef _mm512_castsi512_si256
#define _mm512_castsi512_si256 s5_lo_i
#undef _mm512_castsi256_si512
#define _mm512_castsi256_si512(a) s5_join_i((a), (__m256i){})
#undef _mm512_inserti64x4
#define _mm512_inserti64x4(v, a, imm) ((imm) ? s5_join_i(s5_lo_i(v), (a)) : s5_join_i((a), s5_hi_i(v)))
#undef _mm512_castps_si512
#define _mm512_castps_si512 s5_castps_si512
#undef _mm512_castsi512_ps
#define _mm512_castsi512_ps s5_castsi512_ps
#undef _mm512_castps_pd
#define _mm512_castps_pd s5_castps_pd
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
#define _mm512_mask_or_epi32(src, m, a, b) s5_blend32((src), (m), (__m512i)(a) | (__m512i)(b))
#undef _mm512_mask_add_epi16
#define _mm512_mask_add_epi16(src, m, a, b) s5_blend16((src), (m), (__m512i)((s5_v32h)(a) + (s5_v32h)(b)))
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
