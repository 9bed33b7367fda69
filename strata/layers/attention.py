"""Multi-head attention with GQA over a paged KV cache.

Every forward sees a flat batch of T new tokens from several sequences. `AttentionMetadata` says where each
sequence's queries lie in the flat batch, how long its context is (cached + new tokens) and which cache slots
hold that context. Layers write the new K/V into the cache slots, then attend per sequence with SDPA; the
sequences that decode one token (bf16 cache, native library available) go through one call of the native
kernel (cpu_decode_attention.c) for all of them, straight from the cache slots, also in a step that prefills
other sequences.

A sliding-window layer masks keys older than its window; at a decode step it reads only each sequence's last
`window` slots (`AttentionMetadata.decode_window`). `scale` replaces head_dim ** -0.5 (Gemma 3); `sinks` adds a
learned per-head logit to every softmax denominator (gpt-oss), computed in float32 by `_attention_with_sinks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from strata.layers.quant_native import native_lib


class ContextSlots(Sequence):
    """Per-sequence context slots [context_len] as views of one flat tensor [sum(context_lens)], split on first
    use: a decode step builds the flat tensor, which the one-call decoder reads whole (no per-sequence views)."""

    def __init__(self, flat: torch.Tensor, lens: list[int]):
        self.flat, self.lens, self._parts = flat, lens, None

    def __len__(self) -> int:
        return len(self.lens)

    def __getitem__(self, i):
        if self._parts is None:
            self._parts = self.flat.split(self.lens)
        return self._parts[i]


@dataclass
class AttentionMetadata:
    query_starts: list[int]  # per sequence: first row of its queries in the flat batch
    query_lens: list[int]  # per sequence: number of new tokens this step
    context_lens: list[int]  # per sequence: tokens visible after this step (cached + new)
    slot_mapping: torch.Tensor | None = None  # [T] flat cache slot of each new token; None = no cache
    context_slots: Sequence[torch.Tensor] | None = None  # per sequence [context_len] slots in position order
    _flat: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # see flat_context()
    _windows: dict = field(default_factory=dict, repr=False)  # see decode_window()

    def flat_context(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(all context slots concatenated [sum(context_lens)], offsets [S + 1]); built once, shared by layers."""
        if self._flat is None:
            offsets = torch.tensor([0, *self.context_lens], dtype=torch.int64).cumsum(0)
            self._flat = (torch.cat(self.context_slots).to(torch.int64).contiguous(), offsets)
        return self._flat

    def decode_window(self, window: int) -> AttentionMetadata:
        """For a step where every sequence decodes one token: the same step seeing only the last `window`
        context slots of each sequence (all a sliding-window layer reads); built once, shared by layers."""
        if window not in self._windows:
            self._windows[window] = AttentionMetadata(
                self.query_starts, self.query_lens, [min(n, window) for n in self.context_lens], self.slot_mapping,
                [s[-window:] for s in self.context_slots])
        return self._windows[window]

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
    if (k_cache is not None and sliding_window is not None and meta.context_slots is not None
            and max(meta.context_lens) > sliding_window and all(n == 1 for n in meta.query_lens)):
        meta = meta.decode_window(sliding_window)  # decode past the window: gather only the window's keys
    if sinks is None and k_cache is not None and _native_decode_ok(q, k_cache, v_cache, meta, sliding_window):
        return _native_decode(q, k_cache, v_cache, meta, scale)
    if (sinks is None and k_cache is not None and meta.context_slots is not None and len(meta.query_lens) > 1
            and _all_decodes(meta, sliding_window) and _batched_bytes(q, k_cache, meta) <= BATCHED_DECODE_MAX_BYTES):
        return _batched_decode(q, k_cache, v_cache, meta, scale)  # float16, which no native kernel takes
    native_seqs = _native_decode_seqs(q, k_cache, v_cache, meta, sliding_window) if sinks is None else []
    out = None
    if native_seqs:  # a step mixing prefill chunks with decodes: the decodes in one native call
        rows = torch.tensor([meta.query_starts[i] for i in native_seqs])
        sub = AttentionMetadata(list(range(len(native_seqs))), [1] * len(native_seqs),
                                [meta.context_lens[i] for i in native_seqs], None,
                                [meta.context_slots[i] for i in native_seqs])
        out = torch.empty_like(q)  # [T, Hq, D]
        out[rows] = _native_decode(q[rows], k_cache, v_cache, sub, scale)
    skip = set(native_seqs)
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for i, (qs, ql, cl) in enumerate(zip(meta.query_starts, meta.query_lens, meta.context_lens)):
        if i in skip:
            continue
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
        if out is not None:
            out[qs : qs + ql] = o[0].transpose(0, 1)
        else:
            outs.append(o[0].transpose(0, 1))  # [Q, Hq, D]
    if out is not None:
        return out
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def _native_cache_ok(q, k_cache, v_cache) -> bool:
    """q and caches a native decode kernel takes: bf16 (decode_attention_bf16) or float32 (decode_attention_f32)."""
    return (q.dtype == k_cache.dtype == v_cache.dtype and q.dtype in (torch.bfloat16, torch.float32)
            and q.device.type == "cpu" and q.shape[-1] <= 256 and k_cache.is_contiguous()
            and v_cache.is_contiguous() and native_lib() is not None)


def _all_decodes(meta: AttentionMetadata, window: int | None) -> bool:
    """Every sequence of the step decodes one token, its context within the window."""
    return all(n == 1 for n in meta.query_lens) and (window is None or max(meta.context_lens) <= window)


def _native_decode_ok(q, k_cache, v_cache, meta: AttentionMetadata, window: int | None) -> bool:
    return _all_decodes(meta, window) and _native_cache_ok(q, k_cache, v_cache)


def _native_decode_seqs(q, k_cache, v_cache, meta: AttentionMetadata, window: int | None) -> list[int]:
    """In a step that mixes prefill chunks with decodes: the sequences decoding one token within the window.
    One native call attends for all of them instead of torch ops per sequence (OLMoE's shape, 8 layers, Q4_0: a
    step of 15 decodes and a 55-token prompt went from 481-528 to 446-457 ms of CPU)."""
    if k_cache is None or meta.context_slots is None or all(n == 1 for n in meta.query_lens):
        return []
    if not _native_cache_ok(q, k_cache, v_cache):
        return []
    return [i for i, (ql, cl) in enumerate(zip(meta.query_lens, meta.context_lens))
            if ql == 1 and (window is None or cl <= window)]


def _native_decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float | None = None) -> torch.Tensor:
    """One query per sequence: q [S, Hq, D] -> [S, Hq, D], attending from the cache slots (bf16, or float32 where
    _native_cache_ok allows it)."""
    slots, offsets = meta.flat_context()
    s, hq, d = q.shape
    qc = q.contiguous()
    out = torch.empty_like(qc)
    lib = native_lib()
    kernel = lib.decode_attention_f32 if q.dtype == torch.float32 else lib.decode_attention_bf16
    kernel(qc.data_ptr(), s, hq, k_cache.shape[1], d, k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
           offsets.data_ptr(), d**-0.5 if scale is None else scale, out.data_ptr())
    return out


# the most bytes _batched_decode may gather (K and V of every sequence padded to the longest context): beyond,
# long contexts attend one sequence at a time, whose copies are one sequence's (the memory budget holds)
BATCHED_DECODE_MAX_BYTES = 32 << 20


def _batched_bytes(q, k_cache, meta: AttentionMetadata) -> int:
    """Bytes of the padded K and V copies _batched_decode would make for this step."""
    return 2 * len(meta.query_lens) * max(meta.context_lens) * k_cache.shape[1] * k_cache.shape[2] * q.element_size()


def _batched_decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query per sequence, q [S, Hq, D] -> [S, Hq, D], in torch ops for the whole step (float16, which no native
    kernel takes): every sequence's keys and values gathered into one batch padded to the longest context, the padding masked out of the softmax (float32, as SDPA's); about a dozen
    ops per layer where the loop below runs six per sequence."""
    s, hq, d = q.shape
    hkv = k_cache.shape[1]
    lens = torch.tensor(meta.context_lens)  # [S]
    slots = torch.nn.utils.rnn.pad_sequence(list(meta.context_slots), batch_first=True)  # [S, L], 0 past the end
    keep = torch.arange(slots.shape[1])[None] < lens[:, None]  # [S, L]
    k = k_cache[slots].to(q.dtype).permute(0, 2, 3, 1)  # [S, Hkv, D, L]
    v = v_cache[slots].to(q.dtype).transpose(1, 2)  # [S, Hkv, L, D]
    scores = torch.matmul(q.view(s, hkv, hq // hkv, d), k).float() * scale  # [S, Hkv, G, L]
    scores.masked_fill_(~keep[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(s, hq, d)  # [S, Hkv, G, D] -> [S, Hq, D]


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
