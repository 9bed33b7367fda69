/* One decode token of one sequence through every layer of a Llama-style decoder in one call.
 *
 * Per layer: residual add + RMSNorm, fused q/k/v GEMV, rotary on q and k (k written straight into its cache
 * slot, v copied there), attention over the sequence's cache slots, o GEMV, residual add + RMSNorm, fused
 * gate/up GEMV, SiLU x up, down GEMV. Every step is the same kernel the per-op Python path calls (so the
 * results match it), minus about 30 Python-level operations per layer, which at 4-bit weights are a tenth of
 * a token on a 1B model. Weights may be plain bf16 or any quantized kind, per projection.
 */
#include "quant_cpu.h"

typedef struct { /* one projection: kind WK_*, group size, and its tensors (s, z may be NULL) */
    int64_t kind, group;
    const void *w, *s, *z;
} proj_t;

typedef struct {
    const uint16_t *ln1, *ln2; /* bf16 [H] norm weights */
    proj_t qkv, o, gate_up, down;
    uint16_t *k_cache, *v_cache; /* bf16 [num_slots, Hkv, D] */
} layer_t;

/* x [H]: the embedded token in, the last layer's MLP output out; residual [H] out (the stream before it), so
 * the caller finishes with norm(x + residual). cos/sin bf16 [D] of the position; slots int64 [n_ctx] the
 * sequence's cache slots in position order, the new token's last. */
void decode_layers(const layer_t *layers, int64_t n_layers, int64_t H, int64_t Hq, int64_t Hkv, int64_t D,
                   int64_t I, float eps, float scale, const uint16_t *cos, const uint16_t *sin, const int64_t *slots,
                   int64_t n_ctx, uint16_t *x, uint16_t *residual) {
    const int64_t qd = Hq * D, kvd = Hkv * D, slot = slots[n_ctx - 1];
    const int64_t starts[2] = {0, n_ctx};
    uint16_t *buf = malloc(sizeof(uint16_t) * (size_t)(H + (qd + 2 * kvd) + qd + qd + 2 * I + I));
    uint16_t *h = buf, *qkv = h + H, *q = qkv + qd + 2 * kvd, *att = q + qd, *gu = att + qd, *act = gu + 2 * I;
    for (int64_t l = 0; l < n_layers; l++) {
        const layer_t *L = layers + l;
        if (l == 0) { /* no residual yet: norm(x), and x becomes the residual */
            rms_norm_bf16(x, NULL, L->ln1, 1, H, eps, h, NULL);
            memcpy(residual, x, sizeof(uint16_t) * (size_t)H);
        } else {
            rms_norm_bf16(x, residual, L->ln1, 1, H, eps, h, residual);
        }
        strata_gemv1((int)L->qkv.kind, h, H, L->qkv.w, L->qkv.s, L->qkv.z, qd + 2 * kvd, L->qkv.group, qkv);
        rope_bf16(qkv, 1, Hq, D, 0, cos, sin, q);
        rope_bf16(qkv + qd, 1, Hkv, D, 0, cos, sin, L->k_cache + slot * kvd);
        memcpy(L->v_cache + slot * kvd, qkv + qd + kvd, sizeof(uint16_t) * (size_t)kvd);
        decode_attention_bf16(q, 1, Hq, Hkv, D, L->k_cache, L->v_cache, slots, starts, scale, att);
        strata_gemv1((int)L->o.kind, att, qd, L->o.w, L->o.s, L->o.z, H, L->o.group, x);
        rms_norm_bf16(x, residual, L->ln2, 1, H, eps, h, residual);
        strata_gemv1((int)L->gate_up.kind, h, H, L->gate_up.w, L->gate_up.s, L->gate_up.z, 2 * I, L->gate_up.group, gu);
        silu_mul_bf16(gu, I, act);
        strata_gemv1((int)L->down.kind, act, I, L->down.w, L->down.s, L->down.z, H, L->down.group, x);
    }
    free(buf);
}
