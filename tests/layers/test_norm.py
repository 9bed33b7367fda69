"""RMSNorm: the native fused add + norm (cpu_norm.c) against transformers' numerics in float64, and dispatch."""

import pytest
import torch
import torch.nn.functional as F

from strata.layers.linear import bf16_lib
from strata.layers.norm import RMSNorm

needs_native = pytest.mark.skipif(bf16_lib() is None, reason="native kernels unavailable on this machine")


def _reference(x, residual, weight, eps):
    """HF's order: bf16 add, fp32 norm, cast to bf16, scale by the bf16 weight in bf16."""
    s = x if residual is None else (x.float() + residual.float()).bfloat16()
    h = (s.double() * torch.rsqrt(s.double().pow(2).mean(-1, keepdim=True) + eps)).bfloat16()
    return (h.double() * weight.double()).bfloat16(), s


@needs_native
@pytest.mark.parametrize("rows,hidden", [(1, 2048), (3, 64), (130, 200), (2, 37)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_native_matches_reference(rows, hidden, with_residual):
    g = torch.Generator().manual_seed(rows * hidden)
    norm = RMSNorm(hidden, eps=1e-5).to(torch.bfloat16)
    norm.weight.data = (1 + 0.1 * torch.randn(hidden, generator=g)).bfloat16()
    x = (3 * torch.randn(rows, hidden, generator=g)).bfloat16()
    res = torch.randn(rows, hidden, generator=g).bfloat16() if with_residual else None
    with torch.no_grad():
        out = norm(x, res) if with_residual else norm(x)
    ref, ref_sum = _reference(x, res, norm.weight, 1e-5)
    if with_residual:
        out, new_res = out
        assert torch.equal(new_res, ref_sum)  # the new residual is exactly the bf16 sum
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    # both sides round twice to bf16; the fp32 sum of squares may round the normalised value the other way
    assert ((out.double() - ref.double()).abs() <= ref.double().abs() * 2**-7 + 1e-6).all()


@needs_native
@pytest.mark.parametrize("with_residual", [False, True])
def test_native_takes_strided_views(with_residual, monkeypatch):
    """q/k split out of a fused qkv projection (rows strided): the native kernel, with the contiguous rows'
    exact result, not the float32 torch path."""
    import strata.layers.norm as norm_mod

    g = torch.Generator().manual_seed(7)
    norm = RMSNorm(64, eps=1e-5).to(torch.bfloat16)
    norm.weight.data = (1 + 0.1 * torch.randn(64, generator=g)).bfloat16()
    fused = torch.randn(9, 3 * 64, generator=g).bfloat16()  # [T, 3 * H]
    x = fused.split(64, dim=-1)[1]  # [T, H], row stride 3 * H
    res = fused.split(64, dim=-1)[2] if with_residual else None
    with torch.no_grad():
        assert not x.is_contiguous() and norm_mod._native_ok(x, res, norm.weight)
        expected = norm(x.contiguous(), None if res is None else res.contiguous())
        monkeypatch.setattr(torch.nn.functional, "rms_norm", None)  # the torch path would fail
        got = norm(x, res)
    for a, b in zip(got if with_residual else [got], expected if with_residual else [expected]):
        assert torch.equal(a, b)


def test_float32_keeps_torch_path_and_residual_contract():
    norm = RMSNorm(16, eps=1e-6)
    x, r = torch.randn(2, 16), torch.randn(2, 16)
    out, s = norm(x, r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(out, F.rms_norm(x + r, (16,), eps=1e-6) * norm.weight)


@needs_native
@pytest.mark.parametrize("t,h,d", [(1, 32, 64), (5, 4, 128), (3, 2, 40)])
def test_native_rotary_equals_torch_bf16_on_strided_views(t, h, d):
    """The native rope (cpu_rotary.c) rounds like torch's bf16 ops: results are bit-identical, also on a
    strided view out of a fused projection."""
    from strata.layers import rotary

    g = torch.Generator().manual_seed(d)
    fused = torch.randn(t, (h + 3) * d, generator=g).bfloat16()  # [T, (H + 3) * D]: heads + other projections
    x = fused[:, d : d + h * d].view(t, h, d)  # [T, H, D], row stride (H + 3) * D
    ang = torch.randn(t, 1, d, generator=g)
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
    assert rotary._native_ok(x, cos, sin)
    half = d // 2
    expected = x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin  # torch, bf16
    assert torch.equal(rotary.apply_rotary(x, cos, sin), expected)
