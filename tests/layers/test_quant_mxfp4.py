"""The mxfp4 format (OCP Microscaling e2m1 codes, e8m0 scales per 32): QuantLinear's native GEMV (1-6 rows),
batched dequantize path, torch and reference backends, and `quantized_linear` for modules that keep the
tensors under their own names, all against the float64 reference dequantization."""

from __future__ import annotations

import pytest
import torch

from strata.layers import quant_native
from strata.layers.quant_linear import QuantLinear, quantized_linear
from strata.quant.format import QuantFormat, dequantize_weight

HAS_NATIVE = quant_native.native_lib() is not None
FMT = QuantFormat.parse("mxfp4")


def _random(out: int, inp: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"qweight": torch.randint(0, 256, (out, inp // 2), generator=g, dtype=torch.uint8),
            "scales": torch.randint(118, 131, (out, inp // 32), generator=g, dtype=torch.uint8)}


def _reference(tensors, x, out, inp, bias=None) -> torch.Tensor:
    w = dequantize_weight(tensors, FMT, out, inp, dtype=torch.float64)
    return x.double() @ w.T + (0 if bias is None else bias.double())


def test_format_table():
    assert str(FMT) == "mxfp4" and FMT.bits == 4
    assert FMT.tensor_specs(8, 64) == {"qweight": ((8, 32), torch.uint8), "scales": ((8, 2), torch.uint8)}
    codes = torch.tensor([[0x21, 0xF9] + [0] * 14], dtype=torch.uint8)  # codes 1, 2, 9, 15: 0.5, 1, -0.5, -6, then 0
    w = dequantize_weight({"qweight": codes, "scales": torch.tensor([[128]], dtype=torch.uint8)}, FMT, 1, 32)
    assert w[0, :4].tolist() == [1.0, 2.0, -1.0, -12.0] and not w[0, 4:].any()  # times 2^(128 - 127)


@pytest.mark.parametrize("backend", ["native", "torch", "reference"])
@pytest.mark.parametrize("rows", [1, 3, 4, 6, 40])
def test_quant_linear_matches_reference(backend, rows):
    if backend == "native" and not HAS_NATIVE:
        pytest.skip("native kernels unavailable on this CPU/compiler")
    out, inp = 72, 160
    q = QuantLinear(inp, out, "mxfp4", bias=True)
    for name, t in _random(out, inp).items():
        setattr(q, name, t)
    q.bias = torch.randn(out, dtype=torch.bfloat16)
    q.post_load(backend)
    assert q.backend == backend
    x = torch.randn(rows, inp, dtype=torch.bfloat16)
    ref = _reference(q._tensors(), x, out, inp, q.bias)
    y = q(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out)
    assert (y.double() - ref).abs().max() <= 1e-2 * ref.abs().max()  # bf16 activations and output


@pytest.mark.skipif(not HAS_NATIVE, reason="native kernels unavailable on this CPU/compiler")
def test_native_dequantize_is_exact():
    t = _random(24, 96, seed=1)
    out = torch.empty(24, 96, dtype=torch.bfloat16)
    quant_native.dequantize_rows(quant_native.native_lib(), "mxfp4", t, 0, 24, None, out)
    assert torch.equal(out.float(), dequantize_weight(t, FMT, 24, 96))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 9])
def test_quantized_linear_function(dtype, rows):
    t = _random(40, 64, seed=2)
    bias = torch.randn(40)
    x = torch.randn(3, rows, 64).to(dtype)  # leading dims kept
    y = quantized_linear(x, FMT, t, 40, 64, bias.to(dtype))
    ref = _reference(t, x.reshape(-1, 64), 40, 64, bias.to(dtype)).reshape(3, rows, 40)
    assert y.dtype == dtype and y.shape == (3, rows, 40)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: native GEMV or bf16 matmul
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()
