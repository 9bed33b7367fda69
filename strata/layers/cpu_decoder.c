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
 */
#include "quant_cpu.h"

typedef struct { /* one projection: kind WK_*, group size, and its tensors (s, z may be NULL) */
    int64_t kind, group;
    const void *w, *s, *z;
} proj_t;

typedef struct { /* a MoE block without shared experts: router and the expert tables of moe_decode */
    const uint16_t *router; /* bf16 [E, H] */
    int64_t num_experts, top_k, norm_topk, cast_weights, kind, group, inter;
    const void *const *wgu, *const *sgu, *const *zgu, *const *wd, *const *sd, *const *zd;
} moe_t;

typedef struct {
    const uint16_t *ln1, *ln2; /* bf16 [H] norm weights */
    proj_t qkv, o, gate_up, down; /* gate_up, down unused when moe is set */
    /* k, v, up set (w != NULL): the projections are of different kinds and run apart (a llama.cpp Q4_K_M keeps
     * attn_v and attn_q in different types): qkv then holds q only, gate_up gate only */
    proj_t k, v, up;
    uint16_t *k_cache, *v_cache; /* bf16 [num_slots, Hkv, D] */
    int64_t qk_norm; /* 0 none, 1 per head (Qwen3), 2 over the whole projection (OLMoE) */
    const uint16_t *q_norm, *k_norm;
    double clip; /* clamp q, k, v to [-clip, clip] when > 0 (OLMoE clip_qkv) */
    const moe_t *moe; /* NULL: dense MLP */
} layer_t;

void moe_decode_batch(int64_t kind, const uint16_t *x, int64_t S, int64_t H, int64_t I, int64_t G, int64_t E,
                      int64_t k, const int64_t *ids, const float *weights, const void *const *wgu,
                      const void *const *sgu, const void *const *zgu, const void *const *wd, const void *const *sd,
                      const void *const *zd, uint16_t *out);

/* the torch path of SparseMoeBlock for S tokens h [S, H]: per token softmax in fp32, top-k (ties to the lower
 * id), optional renormalisation, optional cast of the weights to bf16; then the experts for all tokens at once,
 * grouped by expert (moe_decode_batch). The router runs token by token so that each token's routing is the
 * one it gets alone. */
static void moe_block(const moe_t *M, const uint16_t *h, int64_t S, int64_t H, uint16_t *out) {
    const int64_t E = M->num_experts, k = M->top_k;
    uint16_t *logits = malloc(sizeof(uint16_t) * (size_t)E);
    float *p = malloc(sizeof(float) * (size_t)(E + S * k));
    float *w = p + E;
    int64_t *ids = malloc(sizeof(int64_t) * (size_t)(S * k));
    for (int64_t t = 0; t < S; t++) {
        float *wt = w + t * k;
        int64_t *it = ids + t * k;
        gemv_bf16(h + t * H, 1, H, M->router, E, NULL, logits, 0);
        float mx = -INFINITY, sum = 0.0f;
        for (int64_t e = 0; e < E; e++) mx = fmaxf(mx, bf16_to_f32(logits[e]));
        for (int64_t e = 0; e < E; e++) sum += (p[e] = expf(bf16_to_f32(logits[e]) - mx));
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
            if (M->cast_weights) wt[j] = bf16_to_f32(f32_to_bf16(wt[j]));
        }
    }
    moe_decode_batch(M->kind, h, S, H, M->inter, M->group, E, k, ids, w, M->wgu, M->sgu, M->zgu, M->wd, M->sd,
                     M->zd, out);
    free(ids);
    free(p);
    free(logits);
}

static void clamp_bf16(uint16_t *v, int64_t n, float c) {
    for (int64_t i = 0; i < n; i++) {
        float f = bf16_to_f32(v[i]);
        if (f > c) v[i] = f32_to_bf16(c);
        else if (f < -c) v[i] = f32_to_bf16(-c);
    }
}

/* y [S, ystride] at column offset: x [S, K] through one projection of n output rows. tmp [S, n] scratch. */
static void gemv_into(const proj_t *P, const uint16_t *x, int64_t S, int64_t K, int64_t n, uint16_t *y,
                      int64_t ystride, uint16_t *tmp) {
    gemv_once((int)P->kind, x, S, K, P->w, P->s, P->z, n, P->group, S == 1 ? y : tmp);
    if (S > 1)
        for (int64_t r = 0; r < S; r++) memcpy(y + r * ystride, tmp + r * n, sizeof(uint16_t) * (size_t)n);
}

/* S sequences decoding one token each.
 * x [S, H]: the embedded tokens in, the last layer's MLP output out; residual [S, H] out (the stream before
 * it), so the caller finishes with norm(x + residual). cos/sin bf16 [S, D] of the positions; slots int64: the
 * sequences' cache slots in position order, sequence s at [starts[s], starts[s + 1]), its new token last. */
void decode_layers(const layer_t *layers, int64_t n_layers, int64_t S, int64_t H, int64_t Hq, int64_t Hkv,
                   int64_t D, int64_t I, float eps, float scale, const uint16_t *cos, const uint16_t *sin,
                   const int64_t *slots, const int64_t *starts, uint16_t *x, uint16_t *residual) {
    const int64_t qd = Hq * D, kvd = Hkv * D, row = qd + 2 * kvd;
    uint16_t *buf = malloc(sizeof(uint16_t) * (size_t)(S * (H + row + qd + qd + 2 * I + I)));
    uint16_t *h = buf, *qkv = h + S * H, *q = qkv + S * row, *att = q + S * qd, *gu = att + S * qd;
    uint16_t *act = gu + S * 2 * I;
    const int64_t wide = qd > 2 * I ? qd : 2 * I; /* scratch of the split projections: at most q or gate rows */
    uint16_t *tmp = malloc(sizeof(uint16_t) * (size_t)(S * (wide > H ? wide : H)));
    for (int64_t l = 0; l < n_layers; l++) {
        const layer_t *L = layers + l;
        if (l == 0) { /* no residual yet: norm(x), and x becomes the residual */
            rms_norm_bf16(x, NULL, L->ln1, S, H, eps, h, NULL);
            memcpy(residual, x, sizeof(uint16_t) * (size_t)(S * H));
        } else {
            rms_norm_bf16(x, residual, L->ln1, S, H, eps, h, residual);
        }
        if (L->k.w) {
            gemv_into(&L->qkv, h, S, H, qd, qkv, row, tmp);
            gemv_into(&L->k, h, S, H, kvd, qkv + qd, row, tmp);
            gemv_into(&L->v, h, S, H, kvd, qkv + qd + kvd, row, tmp);
        } else {
            gemv_once((int)L->qkv.kind, h, S, H, L->qkv.w, L->qkv.s, L->qkv.z, row, L->qkv.group, qkv);
        }
        for (int64_t s = 0; s < S; s++) {
            uint16_t *r = qkv + s * row;
            if (L->qk_norm == 2) { /* in place: the kernel reads each element before writing it */
                rms_norm_bf16(r, NULL, L->q_norm, 1, qd, eps, r, NULL);
                rms_norm_bf16(r + qd, NULL, L->k_norm, 1, kvd, eps, r + qd, NULL);
            }
            if (L->clip > 0) clamp_bf16(r, row, (float)L->clip);
            if (L->qk_norm == 1) {
                rms_norm_bf16(r, NULL, L->q_norm, Hq, D, eps, r, NULL);
                rms_norm_bf16(r + qd, NULL, L->k_norm, Hkv, D, eps, r + qd, NULL);
            }
            const int64_t slot = slots[starts[s + 1] - 1];
            rope_bf16(r, 1, Hq, D, 0, cos + s * D, sin + s * D, q + s * qd);
            rope_bf16(r + qd, 1, Hkv, D, 0, cos + s * D, sin + s * D, L->k_cache + slot * kvd);
            memcpy(L->v_cache + slot * kvd, r + qd + kvd, sizeof(uint16_t) * (size_t)kvd);
        }
        decode_attention_bf16(q, S, Hq, Hkv, D, L->k_cache, L->v_cache, slots, starts, scale, att);
        gemv_once((int)L->o.kind, att, S, qd, L->o.w, L->o.s, L->o.z, H, L->o.group, x);
        rms_norm_bf16(x, residual, L->ln2, S, H, eps, h, residual);
        if (L->moe) {
            moe_block(L->moe, h, S, H, x);
            continue;
        }
        if (L->up.w) {
            gemv_into(&L->gate_up, h, S, H, I, gu, 2 * I, tmp);
            gemv_into(&L->up, h, S, H, I, gu + I, 2 * I, tmp);
        } else {
            gemv_once((int)L->gate_up.kind, h, S, H, L->gate_up.w, L->gate_up.s, L->gate_up.z, 2 * I,
                      L->gate_up.group, gu);
        }
        for (int64_t s = 0; s < S; s++) silu_mul_bf16(gu + s * 2 * I, I, act + s * I);
        gemv_once((int)L->down.kind, act, S, I, L->down.w, L->down.s, L->down.z, H, L->down.group, x);
    }
    free(tmp);
    free(buf);
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
