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

    def context(i: int, qs: int, ql: int) -> torch.Tensor:  # [K, R + P] latents sequence i attends to
        if cache is None:
            return latent[qs : qs + ql]
        return cache.index_select(0, meta.context_slots[i])[:, 0].to(q_nope.dtype)

    seqs = list(zip(meta.query_starts, meta.query_lens, meta.context_lens))
    outs: list[torch.Tensor | None] = [None] * len(seqs)
    decode = [i for i, (_, ql, _) in enumerate(seqs) if ql == 1]
    if decode:  # every decoding sequence's absorption in one batched matmul per side
        rows = torch.tensor([seqs[i][0] for i in decode])
        q_lat = torch.bmm(q_nope[rows].transpose(0, 1), w_uk).transpose(0, 1)  # [S, Hq, R]
        q = torch.cat((q_lat, q_pe[rows]), dim=-1)  # [S, Hq, R + P]
        o_lat = torch.stack([_latent_attention(q[j], context(i, *seqs[i][:2]), r, scale)
                             for j, i in enumerate(decode)])  # [S, Hq, R]
        o = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [S, Hq, V]
        for j, i in enumerate(decode):
            outs[i] = o[j : j + 1]
    for i, (qs, ql, cl) in enumerate(seqs):
        if outs[i] is None:
            mask = _mask(ql, cl, None, q_nope.device)
            outs[i] = _expanded(q_nope[qs : qs + ql], q_pe[qs : qs + ql], context(i, qs, ql), kv_b_proj, n,
                                v_head_dim, r, scale, mask)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def _latent_attention(q: torch.Tensor, ctx: torch.Tensor, r: int, scale: float) -> torch.Tensor:
    """One absorbed query per head over the cached latents: q [Hq, R + P], ctx [K, R + P] -> [Hq, R];
    softmax in float32."""
    scores = torch.matmul(q, ctx.t()).float() * scale  # [Hq, K]
    probs = torch.softmax(scores, dim=-1).to(ctx.dtype)
    return torch.matmul(probs, ctx[:, :r])  # [Hq, R]


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
