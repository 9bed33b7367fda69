/* One decode token of each of a few sequences through every layer of a decoder in one call.
 *
 * Per layer: residual add + RMSNorm, fused q/k/v GEMV, optional q/k RMSNorm (per head as Qwen3, or over the
 * whole projection as OLMoE) and clipping, rotary on q and k (k written straight into its cache slot, v
 * copied there), attention over the sequence's cache slots, o GEMV, residual add + RMSNorm, then either the
 * dense MLP (fused gate/up GEMV, SiLU x up, down GEMV) or a MoE block (router GEMV, softmax, top-k, the
 * experts of all S tokens through moe_decode_batch, grouped by expert). Every step is the same kernel the per-op Python path calls (so the
 * results match it), minus about 30 Python-level operations per layer (measured gain: docs/benchmarks.md).
 * Weights may be plain bf16 or any quantized kind, per projection; q/k/v (gate/up) of different kinds run as
 * separate GEMVs into the same buffer.
 *
 * decode_layers_f32 is the same decode for a float32 model kept quantized (a GGUF file at its default dtype): fp32
 * activations, norm weights, rotary tables and caches; GGUF's 32-weight blocks through their fp32 GEMV
 * (gemv_qb_f32, about 2^-16 of fp32), other quantized kinds on the activations rounded to bf16 and the output
 * widened back, as QuantLinear runs them; MoE blocks with an fp32 router and moe_decode_batch_f32. The per-op
 * path computes the same in torch ops; its sums run in another order, so the two agree to fp32 rounding rather
 * than bit for bit.
 */
#include "quant_cpu.h"

typedef struct { /* one projection: kind WK_*, group size, and its tensors (s, z may be NULL) */
    int64_t kind, group;
    const void *w, *s, *z;
} proj_t;

typedef struct { /* a MoE block without shared experts: router and the expert tables of moe_decode */
    const void *router; /* [E, H]: bf16 (fp32 in decode_layers_f32) */
    int64_t num_experts, top_k, norm_topk, cast_weights, kind, group, inter;
    const void *const *wgu, *const *sgu, *const *zgu, *const *wd, *const *sd, *const *zd;
} moe_t;

typedef struct {
    const void *ln1, *ln2; /* [H] norm weights: bf16 (fp32 in decode_layers_f32, as every pointer below) */
    proj_t qkv, o, gate_up, down; /* gate_up, down unused when moe is set */
    /* k, v, up set (w != NULL): the projections are of different kinds and run apart (a llama.cpp Q4_K_M keeps
     * attn_v and attn_q in different types): qkv then holds q only, gate_up gate only */
    proj_t k, v, up;
    void *k_cache, *v_cache; /* bf16 [num_slots, Hkv, D] */
    int64_t qk_norm; /* 0 none, 1 per head (Qwen3), 2 over the whole projection (OLMoE) */
    const void *q_norm, *k_norm;
    double clip; /* clamp q, k, v to [-clip, clip] when > 0 (OLMoE clip_qkv) */
    const moe_t *moe; /* NULL: dense MLP */
} layer_t;

void moe_decode_batch(int64_t kind, const uint16_t *x, int64_t S, int64_t H, int64_t I, int64_t G, int64_t E,
                      int64_t k, const int64_t *ids, const float *weights, const void *const *wgu,
                      const void *const *sgu, const void *const *zgu, const void *const *wd, const void *const *sd,
                      const void *const *zd, uint16_t *out);

void moe_decode_batch_f32(int64_t kind, const float *x, int64_t S, int64_t H, int64_t I, int64_t G, int64_t E,
                          int64_t k, const int64_t *ids, const float *weights, const void *const *wgu,
                          const void *const *sgu, const void *const *zgu, const void *const *wd,
                          const void *const *sd, const void *const *zd, float *out);

/* the torch path of SparseMoeBlock for S tokens h [S, H]: per token softmax in fp32, top-k (ties to the lower
 * id), optional renormalisation, optional cast of the weights to bf16 (a float32 model's cast is to fp32: none);
 * then the experts for all tokens at once, grouped by expert (moe_decode_batch, or _f32 when F32: h, out and the
 * router fp32). The router runs token by token so that each token's routing is the one it gets alone. */
static inline __attribute__((always_inline)) void moe_block(const int F32, const moe_t *M, const void *h, int64_t S,
                                                            int64_t H, void *out) {
    const int64_t E = M->num_experts, k = M->top_k;
    float *logits = malloc(sizeof(float) * (size_t)E);
    float *p = malloc(sizeof(float) * (size_t)(E + S * k));
    float *w = p + E;
    int64_t *ids = malloc(sizeof(int64_t) * (size_t)(S * k));
    uint16_t *lb = F32 ? NULL : malloc(sizeof(uint16_t) * (size_t)E);
    for (int64_t t = 0; t < S; t++) {
        float *wt = w + t * k;
        int64_t *it = ids + t * k;
        if (F32) { /* fp32 router [E, H]: one dot product per expert */
            const float *ht = (const float *)h + t * H;
            for (int64_t e = 0; e < E; e++) {
                const float *re = (const float *)M->router + e * H;
                __m512 acc = _mm512_setzero_ps();
                for (int64_t i = 0; i < H; i += 16) {
                    const __mmask16 m = tail16(H - i);
                    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, ht + i), _mm512_maskz_loadu_ps(m, re + i), acc);
                }
                logits[e] = _mm512_reduce_add_ps(acc);
            }
        } else {
            gemv_bf16((const uint16_t *)h + t * H, 1, H, M->router, E, NULL, lb, 0);
            for (int64_t e = 0; e < E; e++) logits[e] = bf16_to_f32(lb[e]);
        }
        float mx = -INFINITY, sum = 0.0f;
        for (int64_t e = 0; e < E; e++) mx = fmaxf(mx, logits[e]);
        for (int64_t e = 0; e < E; e++) sum += (p[e] = expf(logits[e] - mx));
        for (int64_t e = 0; e < E; e++) p[e] /= sum;
        float wsum = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                int taken = 0;
                for (int64_t i = 0; i < j; i++) taken |= it[i] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            it[j] = best;
            wsum += (wt[j] = p[best]);
        }
        for (int64_t j = 0; j < k; j++) {
            if (M->norm_topk) wt[j] /= wsum;
            if (M->cast_weights && !F32) wt[j] = bf16_to_f32(f32_to_bf16(wt[j]));
        }
    }
    if (F32)
        moe_decode_batch_f32(M->kind, h, S, H, M->inter, M->group, E, k, ids, w, M->wgu, M->sgu, M->zgu, M->wd,
                             M->sd, M->zd, out);
    else
        moe_decode_batch(M->kind, h, S, H, M->inter, M->group, E, k, ids, w, M->wgu, M->sgu, M->zgu, M->wd, M->sd,
                         M->zd, out);
    free(lb);
    free(ids);
    free(p);
    free(logits);
}

/* clamp v [n] (bf16, or fp32 when F32) to [-c, c] */
static inline __attribute__((always_inline)) void clamp_any(const int F32, void *v, int64_t n, float c) {
    for (int64_t i = 0; i < n; i++) {
        if (F32) {
            float *f = (float *)v + i;
            *f = *f > c ? c : *f < -c ? -c : *f;
            continue;
        }
        uint16_t *b = (uint16_t *)v + i;
        float f = bf16_to_f32(*b);
        if (f > c) *b = f32_to_bf16(c);
        else if (f < -c) *b = f32_to_bf16(-c);
    }
}

static inline __attribute__((always_inline)) void norm_any(const int F32, const void *x, const void *res,
                                                           const void *w, int64_t T, int64_t H, float eps, void *out,
                                                           void *res_out) {
    if (F32)
        rms_norm_f32(x, res, w, T, H, eps, out, res_out);
    else
        rms_norm_bf16(x, res, w, T, H, eps, out, res_out);
}

/* y [S, n] = x [S, K] through one projection: gemv_once, or for fp32 (F32) gemv_once_f32 (xb, yb its scratch) */
static inline __attribute__((always_inline)) void proj_any(const int F32, const proj_t *P, const void *x, int64_t S,
                                                           int64_t K, int64_t n, void *y, uint16_t *xb,
                                                           uint16_t *yb) {
    if (F32)
        gemv_once_f32((int)P->kind, x, S, K, P->w, P->s, P->z, n, P->group, y, xb, yb);
    else
        gemv_once((int)P->kind, x, S, K, P->w, P->s, P->z, n, P->group, y);
}

/* y [S, ystride] at column offset: x [S, K] through one projection of n output rows. tmp [S, n] scratch. */
static inline __attribute__((always_inline)) void proj_into(const int F32, const proj_t *P, const void *x, int64_t S,
                                                            int64_t K, int64_t n, void *y, int64_t ystride, void *tmp,
                                                            uint16_t *xb, uint16_t *yb) {
    const size_t es = F32 ? 4 : 2;
    proj_any(F32, P, x, S, K, n, S == 1 ? y : tmp, xb, yb);
    if (S > 1)
        for (int64_t r = 0; r < S; r++) memcpy((char *)y + r * ystride * es, (char *)tmp + r * n * es, es * (size_t)n);
}

/* element i of an array of bf16 (F32 = 0) or fp32 numbers */
#define AT(F32, p, i) ((void *)((char *)(p) + (i) * ((F32) ? 4 : 2)))

static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

static inline __attribute__((always_inline)) void decode_layers_any(
    const int F32, const layer_t *layers, int64_t n_layers, int64_t S, int64_t H, int64_t Hq, int64_t Hkv, int64_t D,
    int64_t I, float eps, float scale, const void *cos, const void *sin, const int64_t *slots, const int64_t *starts,
    void *x, void *residual) {
    const int64_t qd = Hq * D, kvd = Hkv * D, row = qd + 2 * kvd;
    const size_t es = F32 ? 4 : 2;
    const int64_t wide = imax(qd, 2 * I); /* scratch of the split projections: at most q or gate rows */
    char *buf = malloc(es * (size_t)(S * (H + row + qd + qd + 2 * I + I)));
    void *h = buf, *qkv = AT(F32, h, S * H), *q = AT(F32, qkv, S * row), *att = AT(F32, q, S * qd);
    void *gu = AT(F32, att, S * qd), *act = AT(F32, gu, S * 2 * I);
    void *tmp = malloc(es * (size_t)(S * imax(wide, H)));
    /* fp32 activations through kernels of bf16 ones (gemv_once_f32): any projection's input and output rows */
    uint16_t *xb = F32 ? malloc(sizeof(uint16_t) * (size_t)(S * imax(imax(H, I), qd))) : NULL;
    uint16_t *yb = F32 ? malloc(sizeof(uint16_t) * (size_t)(S * imax(imax(wide, H), row))) : NULL;
    for (int64_t l = 0; l < n_layers; l++) {
        const layer_t *L = layers + l;
        if (l == 0) { /* no residual yet: norm(x), and x becomes the residual */
            norm_any(F32, x, NULL, L->ln1, S, H, eps, h, NULL);
            memcpy(residual, x, es * (size_t)(S * H));
        } else {
            norm_any(F32, x, residual, L->ln1, S, H, eps, h, residual);
        }
        if (L->k.w) {
            proj_into(F32, &L->qkv, h, S, H, qd, qkv, row, tmp, xb, yb);
            proj_into(F32, &L->k, h, S, H, kvd, AT(F32, qkv, qd), row, tmp, xb, yb);
            proj_into(F32, &L->v, h, S, H, kvd, AT(F32, qkv, qd + kvd), row, tmp, xb, yb);
        } else {
            proj_any(F32, &L->qkv, h, S, H, row, qkv, xb, yb);
        }
        for (int64_t s = 0; s < S; s++) {
            void *r = AT(F32, qkv, s * row);
            if (L->qk_norm == 2) { /* in place: the kernel reads each element before writing it */
                norm_any(F32, r, NULL, L->q_norm, 1, qd, eps, r, NULL);
                norm_any(F32, AT(F32, r, qd), NULL, L->k_norm, 1, kvd, eps, AT(F32, r, qd), NULL);
            }
            if (L->clip > 0) clamp_any(F32, r, row, (float)L->clip);
            if (L->qk_norm == 1) {
                norm_any(F32, r, NULL, L->q_norm, Hq, D, eps, r, NULL);
                norm_any(F32, AT(F32, r, qd), NULL, L->k_norm, Hkv, D, eps, AT(F32, r, qd), NULL);
            }
            const int64_t slot = slots[starts[s + 1] - 1];
            if (F32) {
                rope_f32(r, 1, Hq, D, 0, (const float *)cos + s * D, (const float *)sin + s * D,
                         (float *)q + s * qd);
                rope_f32(AT(F32, r, qd), 1, Hkv, D, 0, (const float *)cos + s * D, (const float *)sin + s * D,
                         (float *)L->k_cache + slot * kvd);
            } else {
                rope_bf16(r, 1, Hq, D, 0, (const uint16_t *)cos + s * D, (const uint16_t *)sin + s * D,
                          (uint16_t *)q + s * qd);
                rope_bf16(AT(F32, r, qd), 1, Hkv, D, 0, (const uint16_t *)cos + s * D, (const uint16_t *)sin + s * D,
                          (uint16_t *)L->k_cache + slot * kvd);
            }
            memcpy(AT(F32, L->v_cache, slot * kvd), AT(F32, r, qd + kvd), es * (size_t)kvd);
        }
        if (F32)
            decode_attention_f32(q, S, Hq, Hkv, D, L->k_cache, L->v_cache, slots, starts, scale, att);
        else
            decode_attention_bf16(q, S, Hq, Hkv, D, L->k_cache, L->v_cache, slots, starts, scale, att);
        proj_any(F32, &L->o, att, S, qd, H, x, xb, yb);
        norm_any(F32, x, residual, L->ln2, S, H, eps, h, residual);
        if (L->moe) {
            moe_block(F32, L->moe, h, S, H, x);
            continue;
        }
        if (L->up.w) {
            proj_into(F32, &L->gate_up, h, S, H, I, gu, 2 * I, tmp, xb, yb);
            proj_into(F32, &L->up, h, S, H, I, AT(F32, gu, I), 2 * I, tmp, xb, yb);
        } else {
            proj_any(F32, &L->gate_up, h, S, H, 2 * I, gu, xb, yb);
        }
        for (int64_t s = 0; s < S; s++) {
            if (F32)
                silu_mul_f32((const float *)gu + s * 2 * I, I, (float *)act + s * I);
            else
                silu_mul_bf16((const uint16_t *)gu + s * 2 * I, I, (uint16_t *)act + s * I);
        }
        proj_any(F32, &L->down, act, S, I, H, x, xb, yb);
    }
    free(yb);
    free(xb);
    free(tmp);
    free(buf);
}
#undef AT

/* S sequences decoding one token each.
 * x [S, H]: the embedded tokens in, the last layer's MLP output out; residual [S, H] out (the stream before
 * it), so the caller finishes with norm(x + residual). cos/sin bf16 [S, D] of the positions; slots int64: the
 * sequences' cache slots in position order, sequence s at [starts[s], starts[s + 1]), its new token last. */
void decode_layers(const layer_t *layers, int64_t n_layers, int64_t S, int64_t H, int64_t Hq, int64_t Hkv,
                   int64_t D, int64_t I, float eps, float scale, const uint16_t *cos, const uint16_t *sin,
                   const int64_t *slots, const int64_t *starts, uint16_t *x, uint16_t *residual) {
    decode_layers_any(0, layers, n_layers, S, H, Hq, Hkv, D, I, eps, scale, cos, sin, slots, starts, x, residual);
}

/* decode_layers for a float32 model (see the top of the file): x, residual, cos, sin and the layers' norm weights,
 * caches and routers fp32 */
void decode_layers_f32(const layer_t *layers, int64_t n_layers, int64_t S, int64_t H, int64_t Hq, int64_t Hkv,
                       int64_t D, int64_t I, float eps, float scale, const float *cos, const float *sin,
                       const int64_t *slots, const int64_t *starts, float *x, float *residual) {
    decode_layers_any(1, layers, n_layers, S, H, Hq, Hkv, D, I, eps, scale, cos, sin, slots, starts, x, residual);
}

/* The step's tail after decode_layers, as CausalLM runs it in torch ops: the final residual add + RMSNorm
 * (rms_norm_bf16), the LM head through gemv_once (for a bf16 weight below 64 rows the kernel linear() picks),
 * rounded to bf16 as the module's output is, then widened to fp32 (the logits' .float()): the same numbers,
 * one call instead of a dozen tensor ops and two module calls.
 *   x, residual bf16 [S, H]   norm_w bf16 [H]   head bf16 [V, H]   scratch bf16 [S * (2 * H + V)]
 *   logits fp32 [S, V] */
void decode_logits_bf16(const uint16_t *x, const uint16_t *residual, const uint16_t *norm_w, int64_t S, int64_t H,
                        float eps, const uint16_t *head, int64_t V, uint16_t *scratch, float *logits) {
    uint16_t *h = scratch, *sum = h + S * H, *y = sum + S * H;
    rms_norm_bf16(x, residual, norm_w, S, H, eps, h, sum);
    gemv_once(WK_BF16, h, S, H, head, NULL, NULL, V, 0, y);
    for (int64_t i = 0; i < S * V; i += 16) { /* bf16 -> fp32 is exact: the bits moved up */
        const __mmask16 m = tail16(S * V - i);
        _mm512_mask_storeu_ps(logits + i, m, bf16x16_load(y + i, m));
    }
}
