"""The decode step's tail in one native call (NativeDecoder.logits): final norm(x + residual), LM head, float,
the same numbers as CausalLM's modules, for heads that take the GEMV (small, up to 16 rows) and the GEMM; and the
modules for what the call does not implement."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from strata.layers.linear import CHUNK_ROWS, Linear, bf16_lib, native_rows
from strata.layers.norm import RMSNorm
from strata.models.native_decode import NativeDecoder

pytestmark = pytest.mark.skipif(bf16_lib() is None, reason="native kernels unavailable on this machine")


def _decoder(norm, head) -> NativeDecoder:
    nd = NativeDecoder.__new__(NativeDecoder)  # only the tail: no layers, no caches
    nd.model = SimpleNamespace(model=SimpleNamespace(norm=norm), lm_head=head)
    return nd


def _modules(hidden: int, vocab: int, bias: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(hidden, eps=1e-5)
    head = Linear(hidden, vocab, bias=bias)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=g))
        head.weight.copy_(0.05 * torch.randn(vocab, hidden, generator=g))
    return norm.to(torch.bfloat16), head.to(torch.bfloat16)


@pytest.mark.parametrize("hidden,vocab", [(160, 2048), (64, 9000)])  # 640 KiB head: GEMV; 1.1 MiB: the GEMM
@torch.inference_mode()
def test_native_tail_equals_the_modules(hidden, vocab):
    norm, head = _modules(hidden, vocab)
    nd = _decoder(norm, head)
    g = torch.Generator().manual_seed(hidden)
    for rows in (1, 3, 8, 9, 16, 17, CHUNK_ROWS - 1):
        x = torch.randn(rows, hidden, generator=g).bfloat16()
        residual = torch.randn(rows, hidden, generator=g).bfloat16()
        want = head(norm(x, residual)[0]).float()  # CausalLM.forward's tail
        got = nd.logits(x, residual)
        if not native_rows(rows, vocab, hidden):  # the AVX2 build hands these rows to torch's float32 matmul
            assert got is None
            continue
        assert got is not None and got.dtype == torch.float32 and got.shape == (rows, vocab)
        assert torch.equal(got, want), rows


@torch.inference_mode()
def test_what_the_call_does_not_implement_runs_the_modules():
    class OtherNorm(RMSNorm):  # e.g. a family's own norm (Gemma's 1 + w)
        pass

    norm, head = _modules(32, 100)
    x = torch.randn(2, 32).bfloat16()
    assert _decoder(norm, head).logits(torch.randn(CHUNK_ROWS, 32).bfloat16(),
                                       torch.randn(CHUNK_ROWS, 32).bfloat16()) is None  # oneDNN's rows
    other = OtherNorm(32).to(torch.bfloat16)
    assert _decoder(other, head).logits(x, x) is None
    _, biased = _modules(32, 100, bias=True)
    assert _decoder(norm, biased).logits(x, x) is None
    assert _decoder(norm.float(), head.float()).logits(x.float(), x.float()) is None
