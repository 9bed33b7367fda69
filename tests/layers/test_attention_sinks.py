"""paged_attention's `sinks` (a per-head logit in every softmax denominator) and `scale`, with and without
sliding windows, prefill and decode over scattered cache slots, against a float64 reference; defaults keep
the plain attention and the native decode kernel."""

import pytest
import torch

from strata.layers import attention as attn_mod
from strata.layers.attention import AttentionMetadata, paged_attention

HQ, HKV, D = 4, 2, 16


def _reference(q, k, v, sinks, scale, window):
    """q [Q, Hq, D] for the last Q positions of k/v [K, Hkv, D] -> [Q, Hq, D] in float64."""
    ql, kl = q.shape[0], k.shape[0]
    k = k.double().repeat_interleave(HQ // HKV, dim=1)
    v = v.double().repeat_interleave(HQ // HKV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale  # [Hq, Q, K]
    qpos, kpos = torch.arange(kl - ql, kl)[:, None], torch.arange(kl)[None]
    allowed = (kpos <= qpos) & (kpos > qpos - window if window else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.double().view(HQ, 1, 1).expand(HQ, ql, 1)], -1)
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1)[..., :kl], v)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("with_sinks", [True, False])
def test_prefill_then_decode_against_reference(window, with_sinks):
    g = torch.Generator().manual_seed(0)
    n, prefill, slots_total = 13, 6, 64
    sinks = torch.randn(HQ, generator=g) * 2 if with_sinks else None
    scale = 0.37
    q, k, v = (torch.randn(n, h, D, generator=g) for h in (HQ, HKV, HKV))
    slots = torch.randperm(slots_total, generator=g)[:n]  # scattered like paged blocks
    cache = (torch.zeros(slots_total, HKV, D), torch.zeros(slots_total, HKV, D))
    meta = AttentionMetadata([0], [prefill], [prefill], slots[:prefill], [slots[:prefill]])
    outs = [paged_attention(q[:prefill], k[:prefill], v[:prefill], cache, meta, window, sinks, scale)]
    for t in range(prefill, n):
        meta = AttentionMetadata([0], [1], [t + 1], slots[t : t + 1], [slots[: t + 1]])
        outs.append(paged_attention(q[t : t + 1], k[t : t + 1], v[t : t + 1], cache, meta, window, sinks, scale))
    ref = torch.cat([_reference(q[:prefill], k[:prefill], v[:prefill], sinks, scale, window)]
                    + [_reference(q[t : t + 1], k[: t + 1], v[: t + 1], sinks, scale, window) for t in range(prefill, n)])
    torch.testing.assert_close(torch.cat(outs).double(), ref, atol=1e-5, rtol=1e-5)


def test_no_cache_prefill_with_sinks():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(9, h, D, generator=g) for h in (HQ, HKV, HKV))
    sinks = torch.randn(HQ, generator=g)
    got = paged_attention(q, k, v, None, AttentionMetadata.no_cache([9]), 4, sinks)
    torch.testing.assert_close(got.double(), _reference(q, k, v, sinks, D**-0.5, 4), atol=1e-5, rtol=1e-5)


def test_sinks_skip_the_native_decode_kernel(monkeypatch):
    called = []
    monkeypatch.setattr(attn_mod, "_native_decode", lambda *a, **k: called.append(1))
    monkeypatch.setattr(attn_mod, "_native_decode_ok", lambda *a: True)
    q, k, v = (torch.randn(1, h, D).bfloat16() for h in (HQ, HKV, HKV))
    cache = (torch.zeros(8, HKV, D).bfloat16(), torch.zeros(8, HKV, D).bfloat16())
    meta = AttentionMetadata([0], [1], [1], torch.tensor([3]), [torch.tensor([3])])
    paged_attention(q, k, v, cache, meta, None, torch.zeros(HQ))
    assert not called
    paged_attention(q, k, v, cache, meta)  # defaults: the plain native path
    assert called


@pytest.mark.skipif(attn_mod.native_lib() is None, reason="native kernels unavailable on this machine")
def test_scale_reaches_the_native_decode_kernel():
    g = torch.Generator().manual_seed(2)
    k, v = (torch.randn(20, HKV, D, generator=g).bfloat16() for _ in range(2))
    q = torch.randn(1, HQ, D, generator=g).bfloat16()
    slots = torch.randperm(32, generator=g)[:20]
    cache = (torch.zeros(32, HKV, D).bfloat16(), torch.zeros(32, HKV, D).bfloat16())
    cache[0][slots], cache[1][slots] = k, v
    meta = AttentionMetadata([0], [1], [20], slots[19:], [slots])
    assert attn_mod._native_decode_ok(q, *cache, meta, None)
    got = paged_attention(q, k[19:], v[19:], cache, meta, scale=0.9)
    torch.testing.assert_close(got.double(), _reference(q, k, v, None, 0.9, None), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(attn_mod.native_lib() is None, reason="native kernels unavailable on this machine")
def test_decode_past_the_window_reads_only_the_window(monkeypatch):
    """Every sequence decoding past its window: the step attends over each sequence's last `window` slots
    (the native kernel serves it), with the masked full context's result."""
    g = torch.Generator().manual_seed(3)
    window, lens = 6, [15, 9, 4]
    k, v = (torch.randn(64, HKV, D, generator=g).bfloat16() for _ in range(2))
    q = torch.randn(len(lens), HQ, D, generator=g).bfloat16()
    slots = [torch.randperm(64, generator=g)[:n] for n in lens]
    cache = (k.clone(), v.clone())
    calls = []
    real = attn_mod._native_decode
    monkeypatch.setattr(attn_mod, "_native_decode", lambda q, kc, vc, m, s=None: calls.append(m) or real(q, kc, vc, m, s))
    meta = AttentionMetadata(list(range(3)), [1] * 3, lens, torch.stack([s[-1] for s in slots]), slots)
    got = paged_attention(q, k[meta.slot_mapping], v[meta.slot_mapping], cache, meta, window)
    assert calls and calls[0].context_lens == [6, 6, 4]
    for i, s in enumerate(slots):
        ref = _reference(q[i : i + 1], k[s], v[s], None, D**-0.5, window)
        torch.testing.assert_close(got[i : i + 1].double(), ref, atol=2e-2, rtol=2e-2)
