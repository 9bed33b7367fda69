"""Multi-head attention with GQA over a paged KV cache.

Every forward sees a flat batch of T new tokens from several sequences. `AttentionMetadata` says where each
sequence's queries lie in the flat batch, how long its context is (cached + new tokens) and which cache slots
hold that context. Layers write the new K/V into the cache slots, then attend per sequence with SDPA; when
every sequence decodes one token (bf16 cache, native library available), one call of the native kernel
(cpu_decode_attention.c) attends for all of them straight from the cache slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from strata.layers.quant_native import native_lib


@dataclass
class AttentionMetadata:
    query_starts: list[int]  # per sequence: first row of its queries in the flat batch
    query_lens: list[int]  # per sequence: number of new tokens this step
    context_lens: list[int]  # per sequence: tokens visible after this step (cached + new)
    slot_mapping: torch.Tensor | None = None  # [T] flat cache slot of each new token; None = no cache
    context_slots: list[torch.Tensor] | None = None  # per sequence [context_len] slots in position order
    _flat: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # see flat_context()

    def flat_context(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(all context slots concatenated [sum(context_lens)], offsets [S + 1]); built once, shared by layers."""
        if self._flat is None:
            offsets = torch.tensor([0, *self.context_lens], dtype=torch.int64).cumsum(0)
            self._flat = (torch.cat(self.context_slots).to(torch.int64).contiguous(), offsets)
        return self._flat

    @classmethod
    def no_cache(cls, seq_lens: list[int]) -> AttentionMetadata:
        """Plain causal forward over whole sequences (no KV cache), e.g. for perplexity."""
        starts = [sum(seq_lens[:i]) for i in range(len(seq_lens))]
        return cls(starts, list(seq_lens), list(seq_lens))


def _mask(query_len: int, context_len: int, window: int | None, device) -> torch.Tensor | None:
    if (window is None or context_len <= window) and (query_len == 1 or query_len == context_len):
        return None  # decode sees everything; a fresh prefill is plain causal
    q_pos = torch.arange(context_len - query_len, context_len, device=device)[:, None]  # [Q, 1]
    k_pos = torch.arange(context_len, device=device)[None, :]  # [1, K]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed  # [Q, K]


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: tuple[torch.Tensor, torch.Tensor] | None,  # each [num_slots, Hkv, D]
    meta: AttentionMetadata,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,  # [Hq] gpt-oss: a learned logit per head in each softmax's denominator
    scale: float | None = None,  # None: head_dim ** -0.5 (Gemma 3: query_pre_attn_scalar ** -0.5)
) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if kv_cache is not None and meta.slot_mapping is not None:
        k_cache, v_cache = kv_cache
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    else:
        k_cache = v_cache = None
    if sinks is None and k_cache is not None and _native_decode_ok(q, k_cache, v_cache, meta, sliding_window):
        return _native_decode(q, k_cache, v_cache, meta, scale)
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for i, (qs, ql, cl) in enumerate(zip(meta.query_starts, meta.query_lens, meta.context_lens)):
        qi = q[qs : qs + ql].transpose(0, 1)[None]  # [1, Hq, Q, D]
        if k_cache is not None:
            slots = meta.context_slots[i]
            ki = k_cache.index_select(0, slots).transpose(0, 1)[None]  # [1, Hkv, K, D]
            vi = v_cache.index_select(0, slots).transpose(0, 1)[None]
        else:
            ki = k[qs : qs + ql].transpose(0, 1)[None]
            vi = v[qs : qs + ql].transpose(0, 1)[None]
        mask = _mask(ql, cl, sliding_window, q.device)
        if sinks is not None:
            outs.append(_attention_with_sinks(qi[0], ki[0].to(qi.dtype), vi[0].to(qi.dtype), mask, scale, sinks))
            continue
        if ql == 1 and mask is None:
            outs.append(_decode_attention(qi[0, :, 0], ki[0].to(qi.dtype), vi[0].to(qi.dtype), scale))
            continue
        o = F.scaled_dot_product_attention(
            qi, ki.to(qi.dtype), vi.to(qi.dtype), attn_mask=mask, is_causal=mask is None and ql > 1, enable_gqa=gqa,
            scale=scale,
        )
        outs.append(o[0].transpose(0, 1))  # [Q, Hq, D]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def _native_decode_ok(q, k_cache, v_cache, meta: AttentionMetadata, window: int | None) -> bool:
    return (
        q.dtype == torch.bfloat16
        and k_cache.dtype == torch.bfloat16
        and v_cache.dtype == torch.bfloat16
        and q.device.type == "cpu"
        and q.shape[-1] <= 256
        and all(n == 1 for n in meta.query_lens)
        and (window is None or max(meta.context_lens) <= window)
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and native_lib() is not None
    )


def _native_decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float | None = None) -> torch.Tensor:
    """One query per sequence: q [S, Hq, D] -> [S, Hq, D], attending from the cache slots."""
    slots, offsets = meta.flat_context()
    s, hq, d = q.shape
    qc = q.contiguous()
    out = torch.empty_like(qc)
    native_lib().decode_attention_bf16(qc.data_ptr(), s, hq, k_cache.shape[1], d, k_cache.data_ptr(),
                                       v_cache.data_ptr(), slots.data_ptr(), offsets.data_ptr(), d**-0.5 if scale is None else scale,
                                       out.data_ptr())
    return out


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """One query per head as two small batched matmuls (SDPA's CPU flash kernel has a high fixed cost per call;
    measured in docs/benchmarks.md, "Decode attention").

    q [Hq, D], k/v [Hkv, K, D] -> [1, Hq, D]; softmax in float32 as SDPA does.
    """
    hq, d = q.shape
    hkv = k.shape[0]
    qg = q.reshape(hkv, hq // hkv, d)  # [Hkv, G, D]: query heads grouped by their KV head
    scores = torch.matmul(qg, k.transpose(1, 2)).float() * (d**-0.5 if scale is None else scale)  # [Hkv, G, K]
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(1, hq, d)  # [1, Hq, D]


def _attention_with_sinks(q, k, v, mask: torch.Tensor | None, scale: float, sinks: torch.Tensor) -> torch.Tensor:
    """Attention whose softmax denominators also hold a learned per-head logit (gpt-oss's sinks), which takes
    probability away from every key without adding a value.

    q [Hq, Q, D], k/v [Hkv, K, D], mask [Q, K] (None: causal) -> [Q, Hq, D]; softmax in float32.
    """
    hq, ql, d = q.shape
    hkv, kl = k.shape[0], k.shape[1]
    qg = q.reshape(hkv, hq // hkv * ql, d)  # [Hkv, G*Q, D]: query heads grouped by their KV head
    scores = torch.matmul(qg, k.transpose(1, 2)).float().view(hq, ql, kl) * scale  # [Hq, Q, K]
    if mask is None:
        mask = torch.ones(ql, kl, dtype=torch.bool).tril(kl - ql)  # causal: query i sees keys <= kl - ql + i
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(hq, 1, 1).expand(hq, ql, 1)  # [Hq, Q, 1]
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :kl]  # [Hq, Q, K]
    o = torch.matmul(probs.to(v.dtype).view(hkv, hq // hkv * ql, kl), v)  # [Hkv, G*Q, D]
    return o.view(hq, ql, d).transpose(0, 1)  # [Q, Hq, D]
