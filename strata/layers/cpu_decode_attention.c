/* Decode attention straight from the paged KV cache: one query token per sequence, bf16 in and out.
 *
 * The torch path gathers each sequence's K/V rows (index_select), then runs two tiny batched matmuls and a
 * softmax: about a dozen ops of a few microseconds each, per layer and token, which at batch 1 costs more than
 * the arithmetic. Here one call reads the cache rows through the slot table and does everything in registers.
 *
 * Per (sequence, KV head) and for each query head of its group: scores of 16 keys at a time (vdpbf16ps over
 * the bf16 q and K rows, then one transpose-and-add tree that turns 16 partial-sum vectors into 16 scores),
 * a vectorised exp, then the probability-weighted sum of V rows in fp32, rounded to bf16 once at the end.
 * Products of two bf16 are exact in fp32; the torch path rounds the scores to bf16 before the softmax, so this
 * kernel is the more accurate of the two. Query heads that share a KV head (GQA) run in pairs when head_dim <= 64,
 * reading each K and V row once for both (attend_pair, with the same results).
 */
#include "quant_cpu.h"


/* one head's K or V row (hb bytes) into L1 */
static inline void prefetch_head(const char *p, int64_t hb) {
    for (int64_t b = 0; b < hb; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

/* K or V rows [from, to) of a context into L1 (to capped at its length n); rb, hb: bytes of a cache row, of a head */
static inline void prefetch_rows(const void *c, const int64_t *sl, int64_t rb, int64_t hb, int64_t from, int64_t to,
                                 int64_t n) {
    for (int64_t t = from; t < to && t < n; t++) prefetch_head((const char *)c + sl[t] * rb, hb);
}

/* a query head's NQ = ceil(NV / 2) 32-lane chunks (zero past D) and their masks, and the masks of the NV 16-lane
 * vectors that cover D in the V pass */
static inline __attribute__((always_inline)) void load_query(const int NV, const uint16_t *qh, int64_t D, __m512i *q,
                                                             __mmask32 *qm, __mmask16 *vm) {
    for (int j = 0; j < (NV + 1) / 2; j++) {
        int64_t left = D - 32 * j;
        qm[j] = left >= 32 ? 0xFFFFFFFFu : left <= 0 ? 0 : (__mmask32)((1ull << left) - 1);
        q[j] = _mm512_maskz_loadu_epi16(qm[j], qh + 32 * j);
    }
    for (int j = 0; j < NV; j++) vm[j] = D - 16 * j <= 0 ? 0 : tail16(D - 16 * j);
}

/* one query head over its context: p[0..n) gets the unnormalised probabilities, out[0..D) the result. NV (the
 * number of 16-lane vectors covering D) is a compile-time constant at every call, so the accumulators stay in
 * registers. F32: q, the caches and out are fp32 (a float32 model's decode), scores by fp32 FMAs. */
static inline __attribute__((always_inline)) void attend_head(const int F32, const int NV, const void *qh, int64_t D,
                                                              const void *kc, const void *vc, int64_t row,
                                                              const int64_t *sl, int64_t n, float scale, float *p,
                                                              void *out) {
    const int NQ = (NV + 1) / 2;
    const int64_t rb = row * (F32 ? 4 : 2), hb = D * (F32 ? 4 : 2); /* bytes of a cache row, of a head */
    __m512i q[8];
    __m512 qf[16];
    __mmask32 qm[8];
    __mmask16 vm[16];
    if (F32)
        for (int j = 0; j < NV; j++) {
            vm[j] = D - 16 * j <= 0 ? 0 : tail16(D - 16 * j);
            qf[j] = _mm512_maskz_loadu_ps(vm[j], (const float *)qh + 16 * j);
        }
    else
        load_query(NV, qh, D, q, qm, vm);
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    /* the rows come through the slot table from anywhere in the cache: their loads stall unless requested early,
     * so each block prefetches the next block's K rows and its own V rows (read by the second pass) */
    prefetch_rows(kc, sl, rb, hb, 0, 16, n);
    for (int64_t t0 = 0; t0 < n; t0 += 16) {
        __m512 acc[16];
        int64_t nb = n - t0 < 16 ? n - t0 : 16;
        prefetch_rows(kc, sl, rb, hb, t0 + 16, t0 + 32, n);
        prefetch_rows(vc, sl, rb, hb, t0, t0 + nb, n);
        for (int i = 0; i < 16; i++) {
            /* past the context's end a block scores its first key again, masked out below: no branch here keeps
             * the 16 sums in registers */
            const char *kr = (const char *)kc + sl[t0 + (i < nb ? i : 0)] * rb;
            acc[i] = _mm512_setzero_ps();
            if (F32)
                for (int j = 0; j < NV; j++)
                    acc[i] = _mm512_fmadd_ps(qf[j], _mm512_maskz_loadu_ps(vm[j], (const float *)kr + 16 * j), acc[i]);
            else
                for (int j = 0; j < NQ; j++) /* q is zero beyond D, so K's lanes there do not count */
                    acc[i] = _mm512_dpbf16_ps(acc[i], AS_BH(q[j]),
                                              AS_BH(_mm512_maskz_loadu_epi16(qm[j], (const uint16_t *)kr + 32 * j)));
        }
        __mmask16 m = tail16(nb);
        __m512 s = _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale));
        _mm512_mask_storeu_ps(p + t0, m, s);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, s);
    }
    const float mx = _mm512_reduce_max_ps(vmax);
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < n; t0 += 16) {
        __mmask16 m = tail16(n - t0);
        __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + t0), _mm512_set1_ps(mx)));
        _mm512_mask_storeu_ps(p + t0, m, e);
        vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
    }
    /* two accumulator sets (even and odd keys) halve the FMA dependency chains */
    __m512 oa[16], ob[16];
    for (int j = 0; j < NV; j++) oa[j] = ob[j] = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 2 <= n; t += 2) {
        const char *va = (const char *)vc + sl[t] * rb, *vb = (const char *)vc + sl[t + 1] * rb;
        __m512 pa = _mm512_set1_ps(p[t]), pb = _mm512_set1_ps(p[t + 1]);
        for (int j = 0; j < NV; j++) {
            oa[j] = _mm512_fmadd_ps(pa, load16_any(F32, va, 16 * j, vm[j]), oa[j]);
            ob[j] = _mm512_fmadd_ps(pb, load16_any(F32, vb, 16 * j, vm[j]), ob[j]);
        }
    }
    if (t < n) {
        const char *va = (const char *)vc + sl[t] * rb;
        __m512 pa = _mm512_set1_ps(p[t]);
        for (int j = 0; j < NV; j++) oa[j] = _mm512_fmadd_ps(pa, load16_any(F32, va, 16 * j, vm[j]), oa[j]);
    }
    const float denom = _mm512_reduce_add_ps(vsum);
    const __m512 inv = _mm512_set1_ps(n > 0 ? 1.0f / denom : 0.0f);
    for (int j = 0; j < NV; j++) {
        store16_any(F32, out, 16 * j, vm[j], _mm512_mul_ps(_mm512_add_ps(oa[j], ob[j]), inv));
    }
}

static inline __attribute__((always_inline)) void attend_head_any(const int F32, const void *qh, int64_t D,
                                                                  const void *kc, const void *vc, int64_t row,
                                                                  const int64_t *sl, int64_t n, float scale, float *p,
                                                                  void *out) {
    if (D <= 32) /* two vectors cover the head: no V work on lanes past D (the bundled model's D = 32) */
        attend_head(F32, 2, qh, D, kc, vc, row, sl, n, scale, p, out);
    else if (D <= 64)
        attend_head(F32, 4, qh, D, kc, vc, row, sl, n, scale, p, out);
    else if (D <= 128)
        attend_head(F32, 8, qh, D, kc, vc, row, sl, n, scale, p, out);
    else
        attend_head(F32, 16, qh, D, kc, vc, row, sl, n, scale, p, out);
}

/* attend_head for two query heads of the same KV head (GQA), which read each K and V row once for both: a tree
 * reduces 8 keys of each head (lanes 0..7 the first head's, 8..15 the second's), and each V row, converted once,
 * feeds both heads' sums. Every score, softmax and sum is attend_head's, in the same order, so the outputs are
 * attend_head's bit for bit. NV <= 4. p0, p1: scratch of n + 16 floats each. */
static inline __attribute__((always_inline)) void attend_pair(const int NV, const uint16_t *qh0, const uint16_t *qh1,
                                                              int64_t D, const uint16_t *kc, const uint16_t *vc,
                                                              int64_t row, const int64_t *sl, int64_t n, float scale,
                                                              float *p0, float *p1, uint16_t *out0, uint16_t *out1) {
    const int NQ = (NV + 1) / 2;
    __m512i q0[2], q1[2];
    __mmask32 qm[2];
    __mmask16 vm[4];
    load_query(NV, qh0, D, q0, qm, vm);
    load_query(NV, qh1, D, q1, qm, vm);
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    prefetch_rows(kc, sl, 2 * row, 2 * D, 0, 8, n);
    for (int64_t t0 = 0; t0 < n; t0 += 8) {
        __m512 acc[16];
        int64_t nb = n - t0 < 8 ? n - t0 : 8;
        prefetch_rows(kc, sl, 2 * row, 2 * D, t0 + 8, t0 + 16, n);
        prefetch_rows(vc, sl, 2 * row, 2 * D, t0, t0 + nb, n);
        for (int i = 0; i < 8; i++) {
            const uint16_t *kr = kc + sl[t0 + (i < nb ? i : 0)] * row; /* as in attend_head */
            acc[i] = acc[8 + i] = _mm512_setzero_ps();
            for (int j = 0; j < NQ; j++) {
                __m512bh k = AS_BH(_mm512_maskz_loadu_epi16(qm[j], kr + 32 * j));
                acc[i] = _mm512_dpbf16_ps(acc[i], AS_BH(q0[j]), k);
                acc[8 + i] = _mm512_dpbf16_ps(acc[8 + i], AS_BH(q1[j]), k);
            }
        }
        __mmask16 m = (__mmask16)(tail16(nb) | tail16(nb) << 8);
        __m512 s = _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale));
        _mm256_mask_storeu_ps(p0 + t0, (__mmask8)m, _mm512_castps512_ps256(s));
        _mm256_mask_storeu_ps(p1 + t0, (__mmask8)m, _mm512_extractf32x8_ps(s, 1));
        vmax = _mm512_mask_max_ps(vmax, m, vmax, s);
    }
    const float mx[2] = {_mm512_mask_reduce_max_ps(0x00FF, vmax), _mm512_mask_reduce_max_ps(0xFF00, vmax)};
    float *ps[2] = {p0, p1};
    float denom[2];
    for (int h = 0; h < 2; h++) {
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t t0 = 0; t0 < n; t0 += 16) {
            __mmask16 m = tail16(n - t0);
            __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, ps[h] + t0), _mm512_set1_ps(mx[h])));
            _mm512_mask_storeu_ps(ps[h] + t0, m, e);
            vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
        }
        denom[h] = _mm512_reduce_add_ps(vsum);
    }
    __m512 oa0[4], ob0[4], oa1[4], ob1[4];
    for (int j = 0; j < NV; j++) oa0[j] = ob0[j] = oa1[j] = ob1[j] = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 2 <= n; t += 2) {
        const uint16_t *va = vc + sl[t] * row, *vb = vc + sl[t + 1] * row;
        __m512 pa0 = _mm512_set1_ps(p0[t]), pb0 = _mm512_set1_ps(p0[t + 1]);
        __m512 pa1 = _mm512_set1_ps(p1[t]), pb1 = _mm512_set1_ps(p1[t + 1]);
        for (int j = 0; j < NV; j++) {
            __m512 a = bf16x16_load(va + 16 * j, vm[j]), b = bf16x16_load(vb + 16 * j, vm[j]);
            oa0[j] = _mm512_fmadd_ps(pa0, a, oa0[j]);
            ob0[j] = _mm512_fmadd_ps(pb0, b, ob0[j]);
            oa1[j] = _mm512_fmadd_ps(pa1, a, oa1[j]);
            ob1[j] = _mm512_fmadd_ps(pb1, b, ob1[j]);
        }
    }
    if (t < n) {
        const uint16_t *va = vc + sl[t] * row;
        __m512 pa0 = _mm512_set1_ps(p0[t]), pa1 = _mm512_set1_ps(p1[t]);
        for (int j = 0; j < NV; j++) {
            __m512 a = bf16x16_load(va + 16 * j, vm[j]);
            oa0[j] = _mm512_fmadd_ps(pa0, a, oa0[j]);
            oa1[j] = _mm512_fmadd_ps(pa1, a, oa1[j]);
        }
    }
    const __m512 inv0 = _mm512_set1_ps(n > 0 ? 1.0f / denom[0] : 0.0f);
    const __m512 inv1 = _mm512_set1_ps(n > 0 ? 1.0f / denom[1] : 0.0f);
    for (int j = 0; j < NV; j++) {
        _mm256_mask_storeu_epi16(out0 + 16 * j, vm[j],
                                 (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_add_ps(oa0[j], ob0[j]), inv0)));
        _mm256_mask_storeu_epi16(out1 + 16 * j, vm[j],
                                 (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_add_ps(oa1[j], ob1[j]), inv1)));
    }
}

/* attend_head_any's two element types, compiled apart (one copy per head size each) */
static __attribute__((noinline)) void attend_head_bf16(const void *qh, int64_t D, const void *kc, const void *vc,
                                                       int64_t row, const int64_t *sl, int64_t n, float scale,
                                                       float *p, void *out) {
    attend_head_any(0, qh, D, kc, vc, row, sl, n, scale, p, out);
}

static __attribute__((noinline)) void attend_head_f32(const void *qh, int64_t D, const void *kc, const void *vc,
                                                      int64_t row, const int64_t *sl, int64_t n, float scale,
                                                      float *p, void *out) {
    attend_head_any(1, qh, D, kc, vc, row, sl, n, scale, p, out);
}

/* the query heads of KV head sk % Hkv of sequence sk / Hkv (p: scratch of the longest context); F32: q, the caches
 * and out fp32, every head alone (the pairs are bf16's) */
static inline __attribute__((always_inline)) void attend_group(const int F32, const void *q, int64_t sk, int64_t Hq,
                                                               int64_t Hkv, int64_t D, const void *kc,
                                                               const void *vc, const int64_t *slots,
                                                               const int64_t *starts, float scale, float *p,
                                                               void *out) {
    const int64_t s = sk / Hkv, kvh = sk % Hkv, G = Hq / Hkv, row = Hkv * D, n = starts[s + 1] - starts[s];
    const size_t es = F32 ? 4 : 2;
    const char *kh = (const char *)kc + kvh * D * es, *vh = (const char *)vc + kvh * D * es;
    int64_t g = 0;
    for (; !F32 && g + 2 <= G && D <= 64; g += 2) { /* query heads in pairs: each K/V row read once for two */
        const int64_t h = kvh * G + g;
        const uint16_t *qh = (const uint16_t *)q + (s * Hq + h) * D;
        uint16_t *o = (uint16_t *)out + (s * Hq + h) * D;
        if (D <= 32)
            attend_pair(2, qh, qh + D, D, (const uint16_t *)kh, (const uint16_t *)vh, row, slots + starts[s], n,
                        scale, p, p + n + 16, o, o + D);
        else
            attend_pair(4, qh, qh + D, D, (const uint16_t *)kh, (const uint16_t *)vh, row, slots + starts[s], n,
                        scale, p, p + n + 16, o, o + D);
    }
    for (; g < G; g++) {
        const int64_t h = kvh * G + g;
        (F32 ? attend_head_f32 : attend_head_bf16)((const char *)q + (s * Hq + h) * D * es, D, kh, vh, row,
                                                   slots + starts[s], n, scale, p, (char *)out + (s * Hq + h) * D * es);
    }
}

/* every (sequence, KV head) pair through attend_group, on an OpenMP team from PAR_MIN_ATTN multiply-adds (a
 * scratch of the longest context per thread), else in the calling thread without entering the OpenMP runtime
 * (PAR_FOR in quant_cpu.h says why) */
static inline __attribute__((always_inline)) void attend_all(const int F32, const void *q, int64_t S, int64_t Hq,
                                                             int64_t Hkv, int64_t D, const void *kc, const void *vc,
                                                             const int64_t *slots, const int64_t *starts,
                                                             float scale, void *out, int64_t max_ctx, int par) {
    if (par) {
#pragma omp parallel
        {
            float *p = malloc(sizeof(float) * (size_t)(2 * (max_ctx + 16)));
#pragma omp for schedule(static)
            for (int64_t sk = 0; sk < S * Hkv; sk++)
                attend_group(F32, q, sk, Hq, Hkv, D, kc, vc, slots, starts, scale, p, out);
            free(p);
        }
    } else {
        float *p = malloc(sizeof(float) * (size_t)(2 * (max_ctx + 16)));
        for (int64_t sk = 0; sk < S * Hkv; sk++)
            attend_group(F32, q, sk, Hq, Hkv, D, kc, vc, slots, starts, scale, p, out);
        free(p);
    }
}

/* the longest context and the q.k multiply-adds of a call */
static inline void attention_size(int64_t S, int64_t Hq, int64_t D, const int64_t *starts, int64_t *max_ctx,
                                  int64_t *macs) {
    int64_t m = 0, work = 0;
    for (int64_t s = 0; s < S; s++) {
        int64_t n = starts[s + 1] - starts[s];
        m = n > m ? n : m;
        work += n;
    }
    *max_ctx = m, *macs = work * Hq * D;
}

/* out[s, h, :] = softmax_k(q[s, h] . K[slot_k, h / G] * scale) @ V[slot_k, h / G] for every sequence s and
 * query head h, where slot_k runs over slots[starts[s] .. starts[s + 1]).
 *   q    bf16 [S, Hq, D] contiguous        kc, vc  bf16 [num_slots, Hkv, D] contiguous
 *   slots int64 [starts[S]]                starts  int64 [S + 1]              out bf16 [S, Hq, D]
 * D <= 256. Work is split over (sequence, KV head) pairs. */
void decode_attention_bf16(const uint16_t *q, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, const uint16_t *kc,
                           const uint16_t *vc, const int64_t *slots, const int64_t *starts, float scale,
                           uint16_t *out) {
    int64_t max_ctx, macs;
    attention_size(S, Hq, D, starts, &max_ctx, &macs);
#ifndef __AVX512F__
    if (D % 16 == 0) { /* the AVX2 build's own kernel (cpu_decode_attention_avx2.c) */
        decode_attention_avx2(q, S, Hq, Hkv, D, kc, vc, slots, starts, scale, out, macs > PAR_MIN_ATTN);
        return;
    }
#endif
    attend_all(0, q, S, Hq, Hkv, D, kc, vc, slots, starts, scale, out, max_ctx, macs > PAR_MIN_ATTN);
}

/* decode_attention_bf16 with q, the caches and out fp32 (a float32 model's decode): attend_head on fp32 loads, one
 * query head at a time */
void decode_attention_f32(const float *q, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, const float *kc,
                          const float *vc, const int64_t *slots, const int64_t *starts, float scale, float *out) {
    int64_t max_ctx, macs;
    attention_size(S, Hq, D, starts, &max_ctx, &macs);
#ifndef __AVX512F__
    if (D % 16 == 0) { /* the AVX2 build's own kernel */
        decode_attention_avx2_f32(q, S, Hq, Hkv, D, kc, vc, slots, starts, scale, out, macs > PAR_MIN_ATTN);
        return;
    }
#endif
    attend_all(1, q, S, Hq, Hkv, D, kc, vc, slots, starts, scale, out, max_ctx, macs > PAR_MIN_ATTN);
}
