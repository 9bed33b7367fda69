"""QuantLinear against a float64 reference: every format, every backend, odd shapes, GEMV and batched paths."""

import logging

import pytest
import torch
from torch import nn

from strata.errors import WeightsError
from strata.layers import quant_linear, quant_native
from strata.layers.quant_linear import QuantLinear, post_load_all, swap_linears
from strata.quant.format import QuantFormat, dequantize_weight, quantize_weight

FORMATS = ["int8", "fp8", "int4-g32", "int4-g64", "int4-g128-asym", "int8-nested-g64", "int4-g256"]
SHAPES = [(37, 172), (5, 33), (48, 256), (3, 1)]  # (out, in): odd sizes, padding, a single column
BACKENDS = ["native", "torch", "reference"]
HAS_NATIVE = quant_native.native_lib() is not None


def _backend(name):
    if name == "native" and not HAS_NATIVE:
        pytest.skip("native kernels unavailable on this CPU/compiler")
    return name


def _check(q: QuantLinear, x: torch.Tensor, bias: torch.Tensor | None):
    w = dequantize_weight(q._tensors(), q.fmt, q.out_features, q.in_features, dtype=torch.float64)
    ref = x.double() @ w.T + (0 if bias is None else bias.double())
    y = q(x)
    assert y.dtype == x.dtype and y.shape == ref.shape
    # bf16 activations, bf16 output: ~2^-8 relative to the output scale
    tol = 1e-2 * ref.abs().max().clamp(min=1e-3)
    assert (y.double() - ref).abs().max() <= tol


CASES = [(b, f, s) for b in BACKENDS for f in FORMATS for s in (SHAPES if b != "reference" else SHAPES[:1])]


@pytest.mark.parametrize("backend,fmt,shape", CASES)
def test_matches_float64_reference(backend, fmt, shape):
    out, inp = shape
    torch.manual_seed(out * 1000 + inp)
    lin = nn.Linear(inp, out, bias=out % 2 == 1)
    q = QuantLinear.from_float(lin, fmt, backend=_backend(backend))
    for rows in (1, 3, 50, 70):  # GEMV, small batch, native GEMM, dequantize + bf16 matmul
        for dtype in (torch.bfloat16, torch.float32):
            _check(q, torch.randn(2, rows, inp, dtype=dtype), lin.bias)


@pytest.mark.parametrize("fmt", ["int8", "int4-g64", "int4-g32-asym", "fp8", "int8-nested-g32"])
def test_native_paths_agree_on_a_threaded_shape(fmt, monkeypatch):
    """A shape big enough for the kernels to split rows across threads; GEMV and batched (tiled) agree."""
    _backend("native")
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(1000, 520, bias=False), fmt, backend="native")
    x = torch.randn(6, 1000, dtype=torch.bfloat16)
    _check(q, x, None)
    q.gemv_max_rows = q.gemm_max_rows = 0  # the dequantize + bf16 matmul path
    tile = 2 * q.fmt.padded_in(1000) * 48  # 48 rows per tile: 11 tiles, the last one partial
    monkeypatch.setattr(quant_linear, "TILE_BYTES", tile)
    monkeypatch.setattr(quant_linear, "TILE_BYTES_1_THREAD", tile)
    batched = q(x)
    _check(q, x, None)
    q.gemv_max_rows = 64
    gemv = q(x)
    torch.testing.assert_close(batched.float(), gemv.float(), atol=3e-2, rtol=2e-2)


def test_meta_build_then_load_by_name():
    torch.manual_seed(0)
    fmt = QuantFormat.parse("int4-g64-asym")
    w, b = torch.randn(24, 100), torch.randn(24)
    state = {**quantize_weight(w, fmt), "bias": b.to(torch.bfloat16)}
    with torch.device("meta"):
        q = QuantLinear(100, 24, fmt, bias=True)
    assert set(q.state_dict()) == {"qweight", "scales", "zeros", "bias"}
    q.load_state_dict(state, assign=True)
    q.post_load()
    _check(q, torch.randn(4, 100, dtype=torch.bfloat16), b.to(torch.bfloat16))


def test_post_load_undoes_widening_casts_and_warns_on_narrowing(caplog):
    t = quantize_weight(torch.randn(8, 64), "int4-g64")
    q = QuantLinear(64, 8, "int4-g64")
    q.load_state_dict({**t, "scales": t["scales"].float()}, assign=True)  # a loader cast fp16 -> fp32
    q.post_load()
    assert q.scales.dtype == torch.float16 and torch.equal(q.scales, t["scales"])
    q.load_state_dict({**t, "scales": t["scales"].to(torch.bfloat16)}, assign=True)  # fp16 -> bf16 rounds
    with caplog.at_level(logging.WARNING):
        q.post_load()
    assert q.scales.dtype == torch.float16
    assert "without casting" in caplog.text or quant_linear._warned_narrowing  # warned once per process
    t8 = quantize_weight(torch.randn(8, 64), "fp8")
    q8 = QuantLinear(64, 8, "fp8")
    q8.load_state_dict({**t8, "qweight": t8["qweight"].to(torch.bfloat16)}, assign=True)  # e4m3 fits bf16
    q8.post_load()
    assert torch.equal(q8.qweight.view(torch.uint8), t8["qweight"].view(torch.uint8))


def test_errors_name_the_module():
    q = QuantLinear(64, 8, "int8")
    q.module_name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(WeightsError, match="q_proj: call post_load"):
        q(torch.randn(1, 64))
    q.qweight, q.scales = torch.zeros(8, 63, dtype=torch.int8), torch.ones(8)  # e.g. a truncated export
    with pytest.raises(WeightsError, match=r"q_proj\.qweight: expected \[8, 64\]"):
        q.post_load()
    with torch.device("meta"):
        m = QuantLinear(64, 8, "int8")
    with pytest.raises(WeightsError, match="before the weights were loaded"):
        m.post_load()


class _Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(16, 32, bias=False), nn.Linear(16, 32, bias=False)
        self.down_proj = nn.Linear(32, 16, bias=False)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16, bias=True)
        self.norm = nn.LayerNorm(16)
        self.experts = nn.ModuleList([_Expert() for _ in range(3)])


def test_swap_linears_on_meta_keeps_bias_and_names():
    with torch.device("meta"):
        model = _Tiny()
    mods = {"q_proj": "int8", "experts.1.gate_proj": "int4-g32", "experts.2.down_proj": "fp8"}
    swap_linears(model, mods)
    assert isinstance(model.experts[1].gate_proj, QuantLinear) and model.experts[1].gate_proj.fmt.kind == "int4"
    assert isinstance(model.experts[0].gate_proj, nn.Linear)  # not listed: stays float
    assert model.q_proj.bias is not None and model.q_proj.bias.is_meta
    assert model.experts[1].gate_proj.module_name == "experts.1.gate_proj"
    keys = set(model.state_dict())
    assert {"q_proj.qweight", "q_proj.scales", "q_proj.bias", "experts.1.gate_proj.qweight"} <= keys
    assert "experts.1.gate_proj.weight" not in keys
    with pytest.raises(WeightsError, match="does not have"):
        swap_linears(model, {"experts.7.up_proj": "int8"})
    with pytest.raises(WeightsError, match="is a LayerNorm"):
        swap_linears(model, {"norm": "int8"})
    with pytest.raises(WeightsError, match="before the weights"):
        post_load_all(model)


@pytest.mark.parametrize("fmt", ["int8", "int4-g32-asym", "int4-g64", "fp8", "int8-nested-g32"])
def test_fused_projections_equal_the_separate_ones(fmt):
    """fuse_quantized: one QuantLinear over q/k/v rows gives the separate outputs side by side, and the separate
    layers keep their state-dict tensors as views of it (no memory doubled)."""
    from strata.layers.fusion import fuse_quantized

    _backend("native")
    torch.manual_seed(1)
    lins = [nn.Linear(160, n, bias=True) for n in (64, 16, 16)]
    qs = [QuantLinear.from_float(lin, fmt, backend="native") for lin in lins]
    x = torch.randn(3, 160, dtype=torch.bfloat16)
    separate = torch.cat([q(x) for q in qs], dim=-1)  # [3, 96]
    before = [{k: v.clone() for k, v in q.state_dict().items()} for q in qs]
    fused = fuse_quantized(qs)
    assert fused is not None and fused.out_features == 96
    for q, sd in zip(qs, before):
        assert q.state_dict().keys() == sd.keys()
        assert all(torch.equal(q.state_dict()[k], v) for k, v in sd.items())
    base = fused.qweight.untyped_storage().data_ptr()
    assert all(q.qweight.untyped_storage().data_ptr() == base for q in qs)
    torch.testing.assert_close(fused(x), separate, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(qs[1](x), separate[:, 64:80], atol=2e-2, rtol=1e-2)  # views still work alone


def test_fusion_refuses_mixed_formats_and_non_native():
    from strata.layers.fusion import fuse_quantized

    lin = nn.Linear(64, 32, bias=False)
    mixed = [QuantLinear.from_float(lin, "int8", backend="reference"), QuantLinear.from_float(lin, "int8")]
    assert fuse_quantized(mixed) is None
    if HAS_NATIVE:
        assert fuse_quantized([QuantLinear.from_float(lin, "int8"), QuantLinear.from_float(lin, "int4-g32")]) is None
