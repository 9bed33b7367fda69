"""Per-operator FLOPs and bytes for one forward step (prefill chunk or decode step) of a ModelShape.

Conventions (each is tested against hand-computed numbers):
* a matmul of N tokens through a [d_in, d_out] weight is 2*N*d_in*d_out FLOPs; it reads the weight once
  per step, reads N*d_in and writes N*d_out activations;
* attention: query j of a sequence with P cached tokens attends to P+j+1 keys (capped by a sliding window);
  GQA/MQA read K/V for num_key_value_heads, never num_attention_heads; a decode step reads the whole cache
  of every sequence once; prefill (fused/flash attention) reads each sequence's cache once and writes the
  new tokens' K/V;
* MLA prefill attends in the decompressed space (qk = nope+rope, v = v_head_dim) while decode uses the
  absorbed form over the cached latent (qk = kv_lora_rank+rope, v = kv_lora_rank), so its cache is
  (kv_lora_rank + qk_rope_dim) elements per token per layer;
* routed experts: N tokens x top_k expert FFNs of FLOPs; weight bytes only of the distinct experts touched,
  E*(1-(1-k/E)^N) expected under uniform routing;
* lm_head runs for one token per sequence in prefill (the last), every sequence in decode.
"""

from __future__ import annotations

from dataclasses import dataclass

from strata.analysis.precision import Precisions
from strata.analysis.shapes import ModelShape

LINEAR_CHUNK = 64  # chunk length of chunked linear-attention (delta-rule) prefill kernels


@dataclass
class Weight:
    name: str
    d_in: int
    d_out: int
    matrices: int = 1  # e.g. 3 for a gated FFN of width d_out (gate, up, down)
    count: int = 1  # instances in the layer (routed experts)
    active: float = 1.0  # instances used per token
    routed: bool = False

    @property
    def params(self) -> int:
        return self.matrices * self.d_in * self.d_out


@dataclass
class Op:
    name: str
    layer: int  # -1 for embedding / lm_head
    flops: float
    weight_bytes: float
    act_bytes: float
    kv_bytes: float = 0.0
    compute: str = "fp16"  # which peak applies
    routed: bool = False
    fmt: str = ""  # storage format of weight_bytes (kernel efficiency depends on it)
    launches: float = 1.0  # kernel calls: 1 per weight matrix, per touched expert when experts run in a loop
    matrix_elems: float = 0.0  # weights of the largest matrix one call multiplies (gate and up fused)
    rows: float = 0.0  # activation rows per call: the step's tokens, or the tokens each touched expert gets

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_bytes + self.kv_bytes

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else float("inf")


def layer_weights(s: ModelShape, i: int) -> list[Weight]:
    h = s.hidden
    w: list[Weight] = [Weight("attn_norm", h, 1), Weight("ffn_norm", h, 1)]
    kind = s.attn_kind[i]
    if kind == "linear":
        kk, vv = s.linear_key_heads * s.linear_key_dim, s.linear_value_heads * s.linear_value_dim
        w += [Weight("in_proj", h, 2 * kk + 2 * vv + 2 * s.linear_value_heads), Weight("out_proj", vv, h)]
    elif s.is_mla:
        qk = s.qk_nope_dim + s.qk_rope_dim
        if s.q_lora_rank:
            w += [Weight("q_a_proj", h, s.q_lora_rank), Weight("q_b_proj", s.q_lora_rank, s.heads * qk)]
        else:
            w.append(Weight("q_proj", h, s.heads * qk))
        w += [Weight("kv_a_proj", h, s.kv_lora_rank + s.qk_rope_dim),
              Weight("kv_b_proj", s.kv_lora_rank, s.heads * (s.qk_nope_dim + s.v_head_dim)),
              Weight("o_proj", s.heads * s.v_head_dim, h)]
    else:
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        w += [Weight("q_proj", h, q), Weight("k_proj", h, kv), Weight("v_proj", h, kv), Weight("o_proj", q, h)]
    if s.moe_layer[i]:
        w.append(Weight("router", h, s.num_experts))
        w.append(Weight("experts", h, s.moe_intermediate, s.ffn_matrices, count=s.num_experts, active=s.top_k,
                        routed=True))
        if s.shared_intermediate:
            w.append(Weight("shared_expert", h, s.shared_intermediate, s.ffn_matrices))
    else:
        w.append(Weight("mlp", h, s.intermediate, s.ffn_matrices))
    return w


def distinct_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts a batch of `tokens` routes to (uniform, independent routing)."""
    if num_experts == 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def _attn_keys(past: int, new: int, window: int) -> int:
    """Sum over the new queries of the number of keys each attends to (causal, optional sliding window)."""
    total = 0
    if not window:
        return new * past + new * (new + 1) // 2
    for j in range(new):
        total += min(past + j + 1, window)
    return total


def attention_op(s: ModelShape, i: int, p: Precisions, batch: int, new: int, past: int) -> Op:
    ab, kb = _b(p.activations), _b(p.kv)
    kind = s.attn_kind[i]
    if kind == "linear":
        hv, dk, dv = s.linear_value_heads, s.linear_key_dim, s.linear_value_dim
        state = batch * hv * dk * dv * 4  # fp32 recurrent state per sequence
        passes = 1 if new == 1 else -(-new // LINEAR_CHUNK)
        flops = 4.0 * batch * new * hv * dk * dv
        return Op("linear_attn", i, flops, 0.0, batch * new * hv * (2 * dk + dv) * ab, 2.0 * state * passes)
    window = s.sliding_window if kind == "sliding" else 0
    keys = batch * _attn_keys(past, new, window)
    if s.is_mla and new == 1:
        qk, v = s.kv_lora_rank + s.qk_rope_dim, s.kv_lora_rank
    elif s.is_mla:
        qk, v = s.qk_nope_dim + s.qk_rope_dim, s.v_head_dim
    else:
        qk = v = s.head_dim
    flops = 2.0 * keys * s.heads * (qk + v)
    if s.is_mla and new > 1 and past:
        flops += 2.0 * batch * past * s.kv_lora_rank * s.heads * (s.qk_nope_dim + s.v_head_dim)
    kv_elems = s.kv_elems_per_token(i)
    old = min(past, window) if window else past
    kv = batch * (old + new) * kv_elems * kb  # read the cached tokens once, write the new ones
    act = batch * new * s.heads * (qk + v) * ab
    return Op("attention", i, flops, 0.0, act, kv)


def _b(fmt: str) -> float:
    from strata.analysis.precision import bytes_per_elem

    return bytes_per_elem(fmt)


def build_ops(s: ModelShape, p: Precisions, batch: int, new: int, past: int) -> list[Op]:
    """Operators of one forward step: `batch` sequences, `new` tokens each, `past` tokens already cached."""
    n = batch * new
    ab = _b(p.activations)
    ops: list[Op] = [Op("embedding", -1, 0.0, n * s.hidden * p.weight_bytes(False, head=True), n * s.hidden * ab)]
    for i in range(s.layers):
        for w in layer_weights(s, i):
            if w.d_out == 1:  # norm: a few FLOPs per element, read + write the hidden state
                ops.append(Op(w.name, i, 4.0 * n * w.d_in, w.d_in * 2.0, 2.0 * n * w.d_in * ab))
                if w.name == "attn_norm":
                    ops.append(attention_op(s, i, p, batch, new, past))
                continue
            wb = p.weight_bytes(w.routed)
            io = w.d_in + w.d_out if w.matrices == 1 else 2 * w.d_in + 3 * w.d_out
            mat = (2 if w.matrices == 3 else 1) * w.d_in * w.d_out
            if w.routed:
                touched = distinct_experts(w.count, int(w.active), n)
                tok = n * w.active
                ops.append(Op(w.name, i, 2.0 * tok * w.params, touched * w.params * wb, tok * io * ab,
                              compute=p.compute(True), routed=True, fmt=p.fmt(True), launches=w.matrices * touched,
                              matrix_elems=mat, rows=tok / max(touched, 1e-9)))
            else:
                ops.append(Op(w.name, i, 2.0 * n * w.params, w.params * wb, n * io * ab, compute=p.compute(),
                              fmt=p.fmt(), launches=w.matrices, matrix_elems=mat, rows=n))
    head_tokens = batch  # prefill needs logits of the last position only
    ops.append(Op("final_norm", -1, 4.0 * head_tokens * s.hidden, s.hidden * 2.0, 2.0 * head_tokens * s.hidden * ab))
    ops.append(Op("lm_head", -1, 2.0 * head_tokens * s.hidden * s.vocab,
                  s.hidden * s.vocab * p.weight_bytes(False, head=True), head_tokens * (s.hidden * ab + s.vocab * 4),
                  compute=p.compute(), fmt=p.fmt(head=True)))
    return ops


def kv_cache_bytes(s: ModelShape, p: Precisions, batch: int, tokens: int) -> float:
    """KV cache (plus linear-attention state) for `batch` sequences of `tokens` tokens."""
    total = 0.0
    for i in range(s.layers):
        if s.attn_kind[i] == "linear":
            total += batch * s.linear_value_heads * s.linear_key_dim * s.linear_value_dim * 4
            continue
        t = min(tokens, s.sliding_window) if s.attn_kind[i] == "sliding" else tokens
        total += batch * t * s.kv_elems_per_token(i) * _b(p.kv)
    return total


def weight_bytes(s: ModelShape, p: Precisions) -> dict[str, float]:
    """Stored weight bytes: routed experts and everything else (embeddings, attention, dense/shared FFN)."""
    experts = other = 0.0
    for i in range(s.layers):
        for w in layer_weights(s, i):
            if w.routed:
                experts += w.params * w.count * p.weight_bytes(True)
            else:
                other += w.params * (2.0 if w.d_out == 1 else p.weight_bytes(False))
    emb = s.vocab * s.hidden * p.weight_bytes(False, head=True)
    other += emb if s.tie_embeddings else 2 * emb
    return {"experts": experts, "non_expert": other, "total": experts + other}


def activation_bytes(s: ModelShape, p: Precisions, batch: int, new: int) -> float:
    """Peak transient activations of one step: the widest intermediate plus fp32 logits."""
    widest = max(s.intermediate * 2, s.moe_intermediate * 2 * max(s.top_k, 1), s.heads * s.head_dim * 3, s.hidden * 4)
    return batch * new * widest * _b(p.activations) + batch * s.vocab * 4
