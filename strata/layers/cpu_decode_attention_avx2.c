/* decode_attention_bf16 (cpu_decode_attention.c) for the AVX2 build, head sizes that are multiples of 16.
 *
 * The AVX-512 kernel scores 16 keys at a time into 16 accumulators of 16 lanes; through quant_cpu_avx2.h those are
 * 32 registers of 8 lanes, twice what AVX2 has, and every vdpbf16ps becomes two FMAs plus the widening of both
 * operands. Here the query head is widened to fp32 once per call, in the order in which 16 bf16 numbers of a K
 * row widen with two integer ops (even elements, then odd ones), so a K row meets it in two FMAs per 16 values; 8
 * keys at a time keep 8 accumulators, which one transpose tree (s5_sum8) turns into 8 scores. The softmax is the
 * AVX-512 kernel's (the same exp polynomial, max subtracted), on 8 lanes. V rows widen the same way into even and
 * odd sums, interleaved back once at the end and rounded to bf16 once; two sets of sums (even and odd keys) halve
 * the FMA dependency chains. Products of two bf16 are exact in fp32: the results are the AVX-512 kernel's up to
 * the order of fp32 sums. Query heads that share a KV head (GQA) run in pairs when D <= 64 (da_pair), loading and
 * widening each K and V row once for both.
 *
 * decode_attention_f32 runs the same kernel on fp32 q, caches and output (a float32 model's decode): the loads split
 * 16 numbers into elements 0-7 and 8-15 instead of even and odd ones, the same split for q, K and V.
 */
#include "quant_cpu.h"

#ifndef __AVX512F__

#define DA_MAXV 16 /* 16-value vectors per head: D <= 256 */

/* element i of an array of bf16 (F32 = 0) or fp32 (F32 = 1) numbers */
#define DA_AT(F32, p, i) ((const char *)(p) + (i) * ((F32) ? 4 : 2))

/* 16 numbers as two vectors of fp32: bf16's even and odd elements; fp32's elements 0-7 and 8-15 (q, K and V split
 * alike, so the dot products and the value sums are the same either way) */
static inline __attribute__((always_inline)) void da_widen(const int F32, const void *p, __m256 *even, __m256 *odd) {
    if (F32) {
        *even = _mm256_loadu_ps((const float *)p);
        *odd = _mm256_loadu_ps((const float *)p + 8);
        return;
    }
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
}

/* exp on 8 lanes: exp_ps of quant_cpu.h (range clamp, Cody-Waite reduction, degree-6 polynomial, times 2^n) */
static inline __m256 da_exp(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT |
                                                                                  _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e)); /* n in [-126, 127]: 2^n is a normal number */
}

static inline float da_hmax(__m256 a) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

static inline float da_hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* 16 values of a head from their two sums (da_widen's split), times inv, in their order: bf16, or fp32 (F32) */
static inline __attribute__((always_inline)) void da_store16(const int F32, __m256 even, __m256 odd, float inv,
                                                            void *out) {
    const __m256 f = _mm256_set1_ps(inv);
    even = _mm256_mul_ps(even, f);
    odd = _mm256_mul_ps(odd, f);
    if (F32) {
        _mm256_storeu_ps((float *)out, even);
        _mm256_storeu_ps((float *)out + 8, odd);
        return;
    }
    __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd); /* [e0 o0 e1 o1 | e4 o4 e5 o5] */
    float v[16];
    _mm256_storeu_ps(v, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(v + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    for (int i = 0; i < 16; i++) ((uint16_t *)out)[i] = f32_to_bf16(v[i]);
}

/* one query head (NV 16-value vectors, a compile-time constant) over its n keys: p (n + 8 floats) is scratch */
static inline __attribute__((always_inline)) void da_head(const int F32, const int NV, const void *qh, const void *kc,
                                                          const void *vc, int64_t row, const int64_t *sl,
                                                          int64_t n, float scale, float *p, void *out) {
    float qf[16 * DA_MAXV]; /* per 16: even elements, then odd */
    for (int j = 0; j < NV; j++) {
        __m256 e, o;
        da_widen(F32, DA_AT(F32, qh, 16 * j), &e, &o);
        _mm256_storeu_ps(qf + 16 * j, e);
        _mm256_storeu_ps(qf + 16 * j + 8, o);
    }
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (int64_t t0 = 0; t0 < n; t0 += 8) {
        const int64_t nb = n - t0 < 8 ? n - t0 : 8;
        for (int64_t t = t0 + 8; t < t0 + 16 && t < n; t++) /* the next block's K rows */
            for (int j = 0; j < NV; j += 2) _mm_prefetch(DA_AT(F32, kc, sl[t] * row + 16 * j), _MM_HINT_T0);
        __m256 acc[8];
        for (int i = 0; i < 8; i++) {
            /* past the context's end a block scores its first key again: a valid score, so the max needs no mask,
             * and the softmax below zeroes those lanes */
            const char *kr = DA_AT(F32, kc, sl[t0 + (i < nb ? i : 0)] * row);
            __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
            for (int j = 0; j < NV; j++) {
                __m256 e, o;
                da_widen(F32, DA_AT(F32, kr, 16 * j), &e, &o);
                a = _mm256_fmadd_ps(e, _mm256_loadu_ps(qf + 16 * j), a);
                b = _mm256_fmadd_ps(o, _mm256_loadu_ps(qf + 16 * j + 8), b);
            }
            acc[i] = _mm256_add_ps(a, b);
        }
        __m256 s = _mm256_mul_ps(s5_sum8(acc), _mm256_set1_ps(scale));
        _mm256_storeu_ps(p + t0, s);
        vmax = _mm256_max_ps(vmax, s);
    }
    const __m256 mx = _mm256_set1_ps(da_hmax(vmax)), iota = _mm256_castsi256_ps(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t t0 = 0; t0 < n; t0 += 8) {
        __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - t0 < 8 ? n - t0 : 8)),
                                                             _mm256_castps_si256(iota)));
        __m256 e = _mm256_and_ps(da_exp(_mm256_sub_ps(_mm256_loadu_ps(p + t0), mx)), live);
        _mm256_storeu_ps(p + t0, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    __m256 ea[DA_MAXV], oa[DA_MAXV], eb[DA_MAXV], ob[DA_MAXV]; /* even / odd values, even / odd keys */
    for (int j = 0; j < NV; j++) ea[j] = oa[j] = eb[j] = ob[j] = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 2 <= n; t += 2) {
        const char *va = DA_AT(F32, vc, sl[t] * row), *vb = DA_AT(F32, vc, sl[t + 1] * row);
        const __m256 pa = _mm256_set1_ps(p[t]), pb = _mm256_set1_ps(p[t + 1]);
        for (int j = 0; j < NV; j++) {
            __m256 e, o;
            da_widen(F32, DA_AT(F32, va, 16 * j), &e, &o);
            ea[j] = _mm256_fmadd_ps(pa, e, ea[j]);
            oa[j] = _mm256_fmadd_ps(pa, o, oa[j]);
            da_widen(F32, DA_AT(F32, vb, 16 * j), &e, &o);
            eb[j] = _mm256_fmadd_ps(pb, e, eb[j]);
            ob[j] = _mm256_fmadd_ps(pb, o, ob[j]);
        }
    }
    if (t < n) {
        const char *va = DA_AT(F32, vc, sl[t] * row);
        const __m256 pa = _mm256_set1_ps(p[t]);
        for (int j = 0; j < NV; j++) {
            __m256 e, o;
            da_widen(F32, DA_AT(F32, va, 16 * j), &e, &o);
            ea[j] = _mm256_fmadd_ps(pa, e, ea[j]);
            oa[j] = _mm256_fmadd_ps(pa, o, oa[j]);
        }
    }
    const float denom = da_hsum(vsum);
    for (int j = 0; j < NV; j++)
        da_store16(F32, _mm256_add_ps(ea[j], eb[j]), _mm256_add_ps(oa[j], ob[j]), n > 0 ? 1.0f / denom : 0.0f,
                   (char *)DA_AT(F32, out, 16 * j));
}

/* da_head for two query heads of the same KV head (GQA; NV <= 4): each K and V row is loaded and widened once for
 * both. Scores 4 keys at a time (lanes 0-3 the first head's, 4-7 the second's, one transpose tree); the V pass
 * runs over the rows once per 32 values of the head, which keeps both heads' sums in 8 registers. p0, p1: scratch
 * of n + 8 floats each. */
static inline __attribute__((always_inline)) void da_pair(const int F32, const int NV, const void *qh0,
                                                          const void *qh1, const void *kc, const void *vc,
                                                          int64_t row, const int64_t *sl, int64_t n, float scale,
                                                          float *p0, float *p1, void *out0, void *out1) {
    float qf[2][64];
    for (int j = 0; j < NV; j++) {
        __m256 e, o;
        da_widen(F32, DA_AT(F32, qh0, 16 * j), &e, &o);
        _mm256_storeu_ps(qf[0] + 16 * j, e);
        _mm256_storeu_ps(qf[0] + 16 * j + 8, o);
        da_widen(F32, DA_AT(F32, qh1, 16 * j), &e, &o);
        _mm256_storeu_ps(qf[1] + 16 * j, e);
        _mm256_storeu_ps(qf[1] + 16 * j + 8, o);
    }
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (int64_t t0 = 0; t0 < n; t0 += 4) {
        const int64_t nb = n - t0 < 4 ? n - t0 : 4;
        for (int64_t t = t0 + 4; t < t0 + 8 && t < n; t++) /* the next block's K rows */
            for (int j = 0; j < NV; j += 2) _mm_prefetch(DA_AT(F32, kc, sl[t] * row + 16 * j), _MM_HINT_T0);
        __m256 acc[8];
        for (int i = 0; i < 4; i++) {
            const char *kr = DA_AT(F32, kc, sl[t0 + (i < nb ? i : 0)] * row); /* as in da_head */
            __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
            for (int j = 0; j < NV; j++) {
                __m256 e, o;
                da_widen(F32, DA_AT(F32, kr, 16 * j), &e, &o);
                a = _mm256_fmadd_ps(o, _mm256_loadu_ps(qf[0] + 16 * j + 8),
                                    _mm256_fmadd_ps(e, _mm256_loadu_ps(qf[0] + 16 * j), a));
                b = _mm256_fmadd_ps(o, _mm256_loadu_ps(qf[1] + 16 * j + 8),
                                    _mm256_fmadd_ps(e, _mm256_loadu_ps(qf[1] + 16 * j), b));
            }
            acc[i] = a;
            acc[4 + i] = b;
        }
        __m256 s = _mm256_mul_ps(s5_sum8(acc), _mm256_set1_ps(scale));
        _mm_storeu_ps(p0 + t0, _mm256_castps256_ps128(s));
        _mm_storeu_ps(p1 + t0, _mm256_extractf128_ps(s, 1));
        vmax = _mm256_max_ps(vmax, s);
    }
    __m128 h0 = _mm256_castps256_ps128(vmax), h1 = _mm256_extractf128_ps(vmax, 1);
    h0 = _mm_max_ps(h0, _mm_movehl_ps(h0, h0));
    h1 = _mm_max_ps(h1, _mm_movehl_ps(h1, h1));
    const float mx[2] = {_mm_cvtss_f32(_mm_max_ss(h0, _mm_movehdup_ps(h0))),
                         _mm_cvtss_f32(_mm_max_ss(h1, _mm_movehdup_ps(h1)))};
    const __m256 iota = _mm256_castsi256_ps(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    float *ps[2] = {p0, p1}, inv[2];
    for (int h = 0; h < 2; h++) {
        __m256 vsum = _mm256_setzero_ps();
        for (int64_t t0 = 0; t0 < n; t0 += 8) {
            __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - t0 < 8 ? n - t0 : 8)),
                                                                 _mm256_castps_si256(iota)));
            __m256 e = _mm256_and_ps(da_exp(_mm256_sub_ps(_mm256_loadu_ps(ps[h] + t0), _mm256_set1_ps(mx[h]))), live);
            _mm256_storeu_ps(ps[h] + t0, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        inv[h] = n > 0 ? 1.0f / da_hsum(vsum) : 0.0f;
    }
    for (int j0 = 0; j0 < NV; j0 += 2) { /* 32 values of both heads per pass over the V rows */
        const int nj = NV - j0 < 2 ? NV - j0 : 2;
        __m256 e0[2], o0[2], e1[2], o1[2];
        for (int j = 0; j < nj; j++) e0[j] = o0[j] = e1[j] = o1[j] = _mm256_setzero_ps();
        for (int64_t t = 0; t < n; t++) {
            const char *vr = DA_AT(F32, vc, sl[t] * row + 16 * j0);
            const __m256 pa = _mm256_set1_ps(p0[t]), pb = _mm256_set1_ps(p1[t]);
            for (int j = 0; j < nj; j++) {
                __m256 e, o;
                da_widen(F32, DA_AT(F32, vr, 16 * j), &e, &o);
                e0[j] = _mm256_fmadd_ps(pa, e, e0[j]);
                o0[j] = _mm256_fmadd_ps(pa, o, o0[j]);
                e1[j] = _mm256_fmadd_ps(pb, e, e1[j]);
                o1[j] = _mm256_fmadd_ps(pb, o, o1[j]);
            }
        }
        for (int j = 0; j < nj; j++) {
            da_store16(F32, e0[j], o0[j], inv[0], (char *)DA_AT(F32, out0, 16 * (j0 + j)));
            da_store16(F32, e1[j], o1[j], inv[1], (char *)DA_AT(F32, out1, 16 * (j0 + j)));
        }
    }
}

static inline __attribute__((always_inline)) void da_head_any(const int F32, const void *qh, int64_t D,
                                                              const void *kc, const void *vc, int64_t row,
                                                              const int64_t *sl, int64_t n, float scale, float *p,
                                                              void *out) {
    switch (D / 16) { /* one compiled copy per common head size keeps the sums in registers */
    case 2: da_head(F32, 2, qh, kc, vc, row, sl, n, scale, p, out); break;
    case 4: da_head(F32, 4, qh, kc, vc, row, sl, n, scale, p, out); break;
    case 8: da_head(F32, 8, qh, kc, vc, row, sl, n, scale, p, out); break;
    case 16: da_head(F32, 16, qh, kc, vc, row, sl, n, scale, p, out); break;
    default: da_head(F32, (int)(D / 16), qh, kc, vc, row, sl, n, scale, p, out);
    }
}

/* da_pair for D <= 64 (a multiple of 16): heads qh and qh + D, outputs out and out + D */
static inline __attribute__((always_inline)) void da_pair_any(const int F32, const void *qh, int64_t D,
                                                              const void *kc, const void *vc, int64_t row,
                                                              const int64_t *sl, int64_t n, float scale, float *p0,
                                                              float *p1, void *out) {
    const void *qh1 = DA_AT(F32, qh, D);
    void *out1 = (char *)DA_AT(F32, out, D);
    switch (D / 16) {
    case 1: da_pair(F32, 1, qh, qh1, kc, vc, row, sl, n, scale, p0, p1, out, out1); break;
    case 2: da_pair(F32, 2, qh, qh1, kc, vc, row, sl, n, scale, p0, p1, out, out1); break;
    case 3: da_pair(F32, 3, qh, qh1, kc, vc, row, sl, n, scale, p0, p1, out, out1); break;
    default: da_pair(F32, 4, qh, qh1, kc, vc, row, sl, n, scale, p0, p1, out, out1);
    }
}

/* decode_attention_bf16 on AVX2 for D a multiple of 16 (the caller checks), and its fp32 twin (F32: q, caches and
 * out fp32): the same arguments and results */
static inline __attribute__((always_inline)) void da_all(const int F32, const void *q, int64_t S, int64_t Hq,
                                                         int64_t Hkv, int64_t D, const void *kc, const void *vc,
                                                         const int64_t *slots, const int64_t *starts, float scale,
                                                         void *out, int64_t par) {
    int64_t max_ctx = 0;
    for (int64_t s = 0; s < S; s++) max_ctx = starts[s + 1] - starts[s] > max_ctx ? starts[s + 1] - starts[s] : max_ctx;
    const int64_t G = Hq / Hkv, row = Hkv * D;
#define DA_GROUP(sk)                                                                                            \
    do {                                                                                                        \
        const int64_t s = (sk) / Hkv, kvh = (sk) % Hkv, n = starts[s + 1] - starts[s];                          \
        const void *kh = DA_AT(F32, kc, kvh * D), *vh = DA_AT(F32, vc, kvh * D);                               \
        int64_t g = 0;                                                                                          \
        for (; g + 2 <= G && D <= 64; g += 2) {                                                                 \
            const int64_t h = kvh * G + g;                                                                      \
            da_pair_any(F32, DA_AT(F32, q, (s * Hq + h) * D), D, kh, vh, row, slots + starts[s], n, scale, p,   \
                        p + max_ctx + 8, (char *)DA_AT(F32, out, (s * Hq + h) * D));                            \
        }                                                                                                       \
        for (; g < G; g++) {                                                                                    \
            const int64_t h = kvh * G + g;                                                                      \
            da_head_any(F32, DA_AT(F32, q, (s * Hq + h) * D), D, kh, vh, row, slots + starts[s], n, scale, p,   \
                        (char *)DA_AT(F32, out, (s * Hq + h) * D));                                             \
        }                                                                                                       \
    } while (0)
    if (par) {
#pragma omp parallel
        {
            float *p = malloc(sizeof(float) * (size_t)(2 * (max_ctx + 8)));
#pragma omp for schedule(static)
            for (int64_t sk = 0; sk < S * Hkv; sk++) DA_GROUP(sk);
            free(p);
        }
    } else {
        float *p = malloc(sizeof(float) * (size_t)(2 * (max_ctx + 8)));
        for (int64_t sk = 0; sk < S * Hkv; sk++) DA_GROUP(sk);
        free(p);
    }
#undef DA_GROUP
}

void decode_attention_avx2(const uint16_t *q, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, const uint16_t *kc,
                           const uint16_t *vc, const int64_t *slots, const int64_t *starts, float scale,
                           uint16_t *out, int64_t par) {
    da_all(0, q, S, Hq, Hkv, D, kc, vc, slots, starts, scale, out, par);
}

/* the same for fp32 q, caches and out (decode_attention_f32) */
void decode_attention_avx2_f32(const float *q, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, const float *kc,
                               const float *vc, const int64_t *slots, const int64_t *starts, float scale, float *out,
                               int64_t par) {
    da_all(1, q, S, Hq, Hkv, D, kc, vc, slots, starts, scale, out, par);
}

#endif
