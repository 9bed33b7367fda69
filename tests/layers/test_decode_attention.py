"""The native paged decode attention (cpu_decode_attention.c) against a float64 reference, and its dispatch."""

import pytest
import torch

from strata.layers import attention as attn_mod
from strata.layers.attention import AttentionMetadata, paged_attention
from strata.layers import quant_native
from strata.layers.quant_native import native_lib

needs_native = pytest.mark.skipif(native_lib() is None, reason="native kernels unavailable on this machine")


def _setup(lens, hq, hkv, d, num_slots=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_slots, hkv, d, generator=g).bfloat16()  # [S, Hkv, D]
    v_cache = torch.randn(num_slots, hkv, d, generator=g).bfloat16()
    perm = torch.randperm(num_slots, generator=g)
    ctx, used = [], 0
    for n in lens:  # scattered, non-contiguous slots like a paged cache
        ctx.append(perm[used : used + n])
        used += n
    q = torch.randn(len(lens), hq, d, generator=g).bfloat16()  # [S, Hq, D]
    return q, k_cache, v_cache, ctx


def _reference(q, k_cache, v_cache, ctx):
    hq, hkv, d = q.shape[1], k_cache.shape[1], q.shape[2]
    out = []
    for i, slots in enumerate(ctx):
        k = k_cache[slots].double().repeat_interleave(hq // hkv, dim=1)  # [K, Hq, D]
        v = v_cache[slots].double().repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("hd,khd->hk", q[i].double(), k) * d**-0.5  # [Hq, K]
        out.append(torch.einsum("hk,khd->hd", torch.softmax(scores, -1), v))
    return torch.stack(out)  # [S, Hq, D]


def _run_native(q, k_cache, v_cache, ctx):
    meta = AttentionMetadata(list(range(len(ctx))), [1] * len(ctx), [len(c) for c in ctx], None, ctx)
    return attn_mod._native_decode(q, k_cache, v_cache, meta)


@needs_native
@pytest.mark.parametrize("lens,hq,hkv,d", [
    ([160], 32, 4, 64),  # GQA, Llama shapes
    ([1], 8, 8, 64),  # a single cached token
    ([7, 300, 33], 12, 2, 128),  # several sequences of different lengths
    ([50, 9], 6, 1, 40),  # MQA, head_dim not a multiple of 16
    ([129], 4, 4, 72),
    ([3, 17, 8], 4, 2, 32),  # the bundled model's heads; contexts that end inside and at a block of 8 keys
    ([9, 24], 6, 3, 48),  # a head size of three 16-value vectors
    ([40], 2, 1, 256),
    ([5, 70], 9, 3, 64),  # SmolLM2's heads: three query heads per KV head (a pair and one alone)
])
def test_kernel_matches_float64(lens, hq, hkv, d):
    q, kc, vc, ctx = _setup(lens, hq, hkv, d, seed=sum(lens) + d)
    out = _run_native(q, kc, vc, ctx)
    ref = _reference(q, kc, vc, ctx)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    # one bf16 rounding of the output (rel. 2^-8) plus fp32 accumulation
    tol = ref.abs() * 2**-8 + 1e-4
    assert ((out.double() - ref).abs() <= tol).all()


@needs_native
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 32), (6, 2, 40), (8, 2, 64), (6, 1, 64)])
def test_gqa_head_pairs_match_one_head_at_a_time(hq, hkv, d):
    """Query heads sharing a KV head attend in pairs (each K/V row read once for two, head_dim <= 64): the same
    result, bit for bit, as each head alone over its own copy of the K/V rows (one query head per KV head)."""
    lens = [1, 7, 8, 9, 17, 100]
    q, kc, vc, ctx = _setup(lens, hq, hkv, d, seed=hq + d)
    out = _run_native(q, kc, vc, ctx)
    g = hq // hkv
    alone = _run_native(q, kc.repeat_interleave(g, dim=1).contiguous(), vc.repeat_interleave(g, dim=1).contiguous(),
                        ctx)
    assert torch.equal(out.view(torch.int16), alone.view(torch.int16))
    tol = _reference(q, kc, vc, ctx).abs() * 2**-8 + 1e-4
    assert ((out.double() - _reference(q, kc, vc, ctx)).abs() <= tol).all()


@needs_native
def test_paged_attention_dispatch_writes_cache_and_agrees_with_torch_path(monkeypatch):
    """Through paged_attention: the native decode path and the torch path give the same result, and the new
    token's K/V land in the cache first (the query sees itself)."""
    q, kc, vc, ctx = _setup([20, 5], 8, 2, 64, seed=3)
    g = torch.Generator().manual_seed(4)
    k_new = torch.randn(2, 2, 64, generator=g).bfloat16()  # [T, Hkv, D]
    v_new = torch.randn(2, 2, 64, generator=g).bfloat16()
    new_slots = torch.tensor([500, 501])
    ctx = [torch.cat([c, s[None]]) for c, s in zip(ctx, new_slots)]
    meta = AttentionMetadata([0, 1], [1, 1], [len(c) for c in ctx], new_slots, ctx)

    calls = []
    real = attn_mod._native_decode
    monkeypatch.setattr(attn_mod, "_native_decode", lambda *a: calls.append(1) or real(*a))
    kc1, vc1 = kc.clone(), vc.clone()
    native = paged_attention(q, k_new, v_new, (kc1, vc1), meta)
    assert calls == [1]
    assert torch.equal(kc1[500], k_new[0]) and torch.equal(vc1[501], v_new[1])

    monkeypatch.setattr(attn_mod, "_native_decode_ok", lambda *a: False)
    meta2 = AttentionMetadata([0, 1], [1, 1], [len(c) for c in ctx], new_slots, ctx)
    torch_path = paged_attention(q, k_new, v_new, (kc.clone(), vc.clone()), meta2)
    ref = _reference(q, kc1, vc1, ctx)
    assert (native.double() - ref).abs().max() < 1e-2
    assert (torch_path.double() - ref).abs().max() < 3e-2  # the torch path rounds scores to bf16


def test_float32_decodes_attend_in_one_padded_batch(monkeypatch):
    """Decodes of a float32 model (caches the native kernel does not take): one padded batch for the step, padding
    masked out: the float64 reference's numbers within float32 rounding, whatever the contexts' lengths; with a
    sliding window, over the window's keys; past a bound on the padded copies, one sequence at a time."""
    lens = [1, 37, 5, 64]
    q, kc, vc, ctx = _setup(lens, 8, 2, 64, seed=7)
    q, kc, vc = q.float(), kc.float(), vc.float()
    calls = []
    real = attn_mod._batched_decode
    monkeypatch.setattr(attn_mod, "_batched_decode", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(attn_mod, "_native_cache_ok", lambda *a: False)  # the AVX2 build's kernel: the next test
    new = torch.arange(500, 504)  # each sequence's new token, written first
    ctx = [torch.cat([c, s[None]]) for c, s in zip(ctx, new)]
    lens = [len(c) for c in ctx]
    kv_new = torch.randn(4, 2, 64), torch.randn(4, 2, 64)  # [T, Hkv, D]
    meta = AttentionMetadata(list(range(4)), [1] * 4, lens, new, ctx)
    out = paged_attention(q, *kv_new, (kc, vc), meta)
    assert calls == [1] and out.shape == q.shape and torch.equal(kc[503], kv_new[0][3])
    ref = _reference(q, kc, vc, ctx)
    assert (out.double() - ref).abs().max() < 1e-5
    window = AttentionMetadata(list(range(4)), [1] * 4, lens, new, ctx)  # contexts past it: the window's keys
    out = paged_attention(q, *kv_new, (kc, vc), window, sliding_window=32)
    assert calls == [1, 1]
    assert (out.double() - _reference(q, kc, vc, [c[-32:] for c in ctx])).abs().max() < 1e-5
    # contexts whose padded copies would pass BATCHED_DECODE_MAX_BYTES: one sequence at a time, the same numbers
    monkeypatch.setattr(attn_mod, "BATCHED_DECODE_MAX_BYTES", attn_mod._batched_bytes(q, kc, meta) - 1)
    out = paged_attention(q, *kv_new, (kc, vc), AttentionMetadata(list(range(4)), [1] * 4, lens, new, ctx))
    assert calls == [1, 1]
    assert (out.double() - ref).abs().max() < 1e-5


@needs_native
@pytest.mark.parametrize("lens,hq,hkv,d", [([1, 9, 40], 8, 2, 64), ([70], 9, 3, 64), ([3, 130], 4, 4, 128),
                                          ([17, 5], 4, 2, 32), ([33], 2, 1, 16), ([12, 20], 4, 2, 40),
                                          ([5], 2, 2, 256)])
def test_float32_kernel_matches_float64(lens, hq, hkv, d, monkeypatch):
    """float32 q and caches (a float32 model's decode) on the native kernel (on the AVX2 build its own kernel for
    heads of a multiple of 16, the AVX-512 code on half-width registers for others), through paged_attention: the
    float64 reference within float32 rounding, one sequence or several, GQA pairs and single heads."""
    q, kc, vc, ctx = _setup(lens, hq, hkv, d, seed=len(lens) + d)
    q, kc, vc = q.float(), kc.float() + 1e-3 * torch.randn_like(kc.float()), vc.float()  # not bf16 values
    calls = []
    real = attn_mod._native_decode
    monkeypatch.setattr(attn_mod, "_native_decode", lambda *a: calls.append(1) or real(*a))
    new = torch.arange(500, 500 + len(lens))
    ctx = [torch.cat([c, s[None]]) for c, s in zip(ctx, new)]
    kv_new = torch.randn(len(lens), hkv, d), torch.randn(len(lens), hkv, d)
    meta = AttentionMetadata(list(range(len(lens))), [1] * len(lens), [len(c) for c in ctx], new, ctx)
    out = paged_attention(q, *kv_new, (kc, vc), meta)
    assert calls == [1] and out.dtype == torch.float32
    assert (out.double() - _reference(q, kc, vc, ctx)).abs().max() < 2e-6


def test_fallbacks_keep_the_torch_path():
    """fp16 caches, prefill rows and windows shorter than the context never take the native path; bf16 and fp32
    caches of any head size do."""
    q, kc, vc, ctx = _setup([10], 4, 4, 64)
    meta = AttentionMetadata([0], [1], [10], None, ctx)
    assert not attn_mod._native_decode_ok(q.half(), kc.half(), vc.half(), meta, None)
    assert attn_mod._native_decode_ok(q.float(), kc.float(), vc.float(), meta, None) == (native_lib() is not None)
    q8, kc8, vc8, ctx8 = _setup([10], 4, 4, 8)
    assert attn_mod._native_decode_ok(q8.float(), kc8.float(), vc8.float(), meta, None) == (native_lib() is not None)
    assert not attn_mod._native_decode_ok(q, kc, vc, AttentionMetadata([0], [2], [10], None, ctx), None)
    assert not attn_mod._native_decode_ok(q, kc, vc, meta, 8)


@needs_native
def test_mixed_step_decodes_go_native_and_prefill_rows_keep_sdpa(monkeypatch):
    """A step with a prefill chunk between two decodes: the decodes are attended in one native call, the chunk's
    rows are exactly the torch path's, and the decodes agree with it within the torch path's bf16 rounding."""
    hq, hkv, d = 8, 2, 64
    q_dec, kc, vc, ctx = _setup([20, 30], hq, hkv, d, seed=5)
    g = torch.Generator().manual_seed(6)
    q_pre = torch.randn(4, hq, d, generator=g).bfloat16()  # a prefill chunk of 4 tokens after 6 cached ones
    pre_ctx = torch.arange(400, 410)
    q = torch.cat([q_dec[:1], q_pre, q_dec[1:]])  # [6, Hq, D]: decode, chunk, decode
    k_new = torch.randn(6, hkv, d, generator=g).bfloat16()
    v_new = torch.randn(6, hkv, d, generator=g).bfloat16()
    new_slots = torch.tensor([500, 406, 407, 408, 409, 501])
    ctxs = [torch.cat([ctx[0], new_slots[:1]]), pre_ctx, torch.cat([ctx[1], new_slots[5:]])]

    def run():
        meta = AttentionMetadata([0, 1, 5], [1, 4, 1], [len(c) for c in ctxs], new_slots, ctxs)
        return paged_attention(q, k_new, v_new, (kc.clone(), vc.clone()), meta)

    calls = []
    real = attn_mod._native_decode
    monkeypatch.setattr(attn_mod, "_native_decode", lambda q, *a: calls.append(q.shape[0]) or real(q, *a))
    mixed = run()
    assert calls == [2]
    monkeypatch.setattr(attn_mod, "_native_decode_seqs", lambda *a: [])
    torch_path = run()
    assert calls == [2]
    assert torch.equal(mixed[1:5], torch_path[1:5])
    assert (mixed[[0, 5]].double() - torch_path[[0, 5]].double()).abs().max() < 3e-2
