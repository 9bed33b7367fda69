"""Multi-head latent attention (MLA, DeepSeek-V2/V3) over the paged KV cache.

Per token the cache holds one row of `kv_lora_rank + qk_rope_head_dim` values shared by every head: the
compressed latent c (after kv_a_layernorm) and the rotated decoupled key k_pe (KVCacheSpec with one "k" head
and no value, strata/layers/kv_cache.py). kv_b_proj [Hq * (nope + v), R] maps c to each head's key (its nope
part) and value.

- Prefill (a sequence with several new tokens): the context's latents are expanded through kv_b_proj into
  keys [K, Hq, nope + rope] and values [K, Hq, v], then SDPA.
- Decode (one new token): absorbed. kv_b_proj's key part W_UK [Hq, nope, R] is folded into the query
  (q_lat = q_nope W_UK), so scores are q_lat . c + q_pe . k_pe straight from the cached rows; the value part
  W_UV [Hq, v, R] is applied after attention to the latent output. Nothing is expanded per cached token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strata.layers.attention import AttentionMetadata, _mask


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] whose rotary pairs are interleaved (x0, x1), (x2, x3)... -> rotated, de-interleaved
    (the first half holds the pairs' first elements). Queries and keys take the same layout, so their dot
    products equal the interleaved rotation's. cos/sin [T, 1, D] as RotaryEmbedding makes them."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]  # [T, 1, D/2]: cos/sin are cat(freqs, freqs)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # [T, H, D/2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def mla_attention(
    q_nope: torch.Tensor,  # [T, Hq, N]
    q_pe: torch.Tensor,  # [T, Hq, P] rotated
    latent: torch.Tensor,  # [T, R + P]: kv_a_layernorm(c) and the rotated k_pe of the new tokens
    kv_cache: tuple[torch.Tensor, ...] | None,  # (latents [num_slots, 1, R + P],)
    meta: AttentionMetadata,
    kv_b_proj: nn.Module,  # [R] -> [Hq * (N + V)]
    v_head_dim: int,
    scale: float,
) -> torch.Tensor:
    """-> attention output [T, Hq, V] (before o_proj)."""
    hq, n = q_nope.shape[1:]
    r = latent.shape[-1] - q_pe.shape[-1]
    cache = kv_cache[0] if kv_cache is not None and meta.slot_mapping is not None else None
    if cache is not None:
        cache.index_copy_(0, meta.slot_mapping, latent[:, None, :].to(cache.dtype))
    w = kv_b_proj.weight.view(hq, n + v_head_dim, r)
    w_uk, w_uv = w[:, :n], w[:, n:]  # [Hq, N, R], [Hq, V, R]
    outs = []
    for i, (qs, ql, cl) in enumerate(zip(meta.query_starts, meta.query_lens, meta.context_lens)):
        if cache is not None:
            ctx = cache.index_select(0, meta.context_slots[i])[:, 0].to(q_nope.dtype)  # [K, R + P]
        else:
            ctx = latent[qs : qs + ql]
        qn, qp = q_nope[qs : qs + ql], q_pe[qs : qs + ql]  # [Q, Hq, N], [Q, Hq, P]
        if ql == 1:
            outs.append(_absorbed_decode(qn[0], qp[0], ctx, w_uk, w_uv, r, scale)[None])
            continue
        outs.append(_expanded(qn, qp, ctx, kv_b_proj, n, v_head_dim, r, scale, _mask(ql, cl, None, q_nope.device)))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def _absorbed_decode(qn, qp, ctx, w_uk, w_uv, r: int, scale: float) -> torch.Tensor:
    """One query: qn [Hq, N], qp [Hq, P], ctx [K, R + P] -> [Hq, V]; softmax in float32."""
    q_lat = torch.bmm(qn[:, None, :], w_uk)[:, 0]  # [Hq, R]
    q = torch.cat((q_lat, qp), dim=-1)  # [Hq, R + P]
    scores = torch.matmul(q, ctx.t()).float() * scale  # [Hq, K]
    probs = torch.softmax(scores, dim=-1).to(ctx.dtype)
    o_lat = torch.matmul(probs, ctx[:, :r])  # [Hq, R]
    return torch.bmm(o_lat[:, None, :], w_uv.transpose(1, 2))[:, 0]  # [Hq, V]


def _expanded(qn, qp, ctx, kv_b_proj, n: int, v: int, r: int, scale: float, mask) -> torch.Tensor:
    """Several queries: qn [Q, Hq, N], qp [Q, Hq, P], ctx [K, R + P] -> [Q, Hq, V]."""
    k_len, hq = ctx.shape[0], qn.shape[1]
    kv = kv_b_proj(ctx[:, :r]).view(k_len, hq, n + v)  # [K, Hq, N + V]
    k_pe = ctx[:, None, r:].expand(k_len, hq, ctx.shape[1] - r)  # [K, Hq, P]
    k = torch.cat((kv[..., :n], k_pe), dim=-1).transpose(0, 1)[None]  # [1, Hq, K, N + P]
    val = kv[..., n:].transpose(0, 1)[None]  # [1, Hq, K, V]
    q = torch.cat((qn, qp), dim=-1).transpose(0, 1)[None]  # [1, Hq, Q, N + P]
    o = F.scaled_dot_product_attention(q, k, val, attn_mask=mask, is_causal=mask is None, scale=scale)
    return o[0].transpose(0, 1)  # [Q, Hq, V]
