"""QuantLinear on llama.cpp blocks kept as in GGUF (K-quants q4_k, q5_k, q6_k; 32-weight q8_0, q4_1, q5_0,
q5_1): native GEMV (1-4 rows, threaded), the batched dequantize path, the torch and reference backends and fused
projections, all against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from strata.layers import quant_linear, quant_native
from strata.layers.fusion import fuse_quantized
from strata.layers.quant_linear import QuantLinear
from strata.quant import ggml_blocks, kquant
from strata.quant.format import dequantize_weight

KINDS = [*kquant.BLOCK_BYTES, *ggml_blocks.BLOCK_BYTES]
HAS_NATIVE = quant_native.native_lib() is not None


def _layer(kind, out, inp, backend, seed=0, bias=False):
    q = QuantLinear(inp, out, kind, bias=bias)
    blocks = kquant if kind in kquant.BLOCK_BYTES else ggml_blocks
    q.qweight = blocks.random_blocks(kind, out, inp, seed=seed)
    if bias:
        q.bias = torch.randn(out, dtype=torch.bfloat16)
    if backend == "native" and not HAS_NATIVE:
        pytest.skip("native kernels unavailable on this CPU/compiler")
    q.post_load(backend)
    return q


def _check(q, x):
    w = dequantize_weight(q._tensors(), q.fmt, q.out_features, q.in_features, dtype=torch.float64)
    ref = x.double() @ w.T + (0 if q.bias is None else q.bias.double())
    y = q(x)
    assert y.dtype == x.dtype and y.shape == ref.shape
    tol = 1e-2 * ref.abs().max()  # bf16 activations and output: ~2^-8 of the output scale
    assert (y.double() - ref).abs().max() <= tol


@pytest.mark.parametrize("backend", ["native", "torch", "reference"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_float64_reference(kind, backend):
    q = _layer(kind, 37, 512, backend, bias=True)  # 37 rows: whole 4-row blocks and a remainder
    for rows in (1, 2, 3, 4, 5, 50, 70):  # GEMV at each compiled row count, two passes, GEMM, dequantize
        for dtype in (torch.bfloat16, torch.float32):
            _check(q, torch.randn(rows, 512, dtype=dtype))


@pytest.mark.parametrize("kind", KINDS)
def test_native_threaded_gemv_and_tiles(kind, monkeypatch):
    """A shape big enough to split rows across threads; GEMV and tiled batched path agree with the reference."""
    q = _layer(kind, 300, 1024, "native", seed=3)
    x = torch.randn(4, 1024, dtype=torch.bfloat16)
    _check(q, x)
    q.gemv_max_rows = q.gemm_max_rows = 0  # the dequantize + bf16 matmul path
    monkeypatch.setattr(quant_linear, "TILE_BYTES", 2 * 1024 * 48)  # 48-row tiles, the last one partial
    monkeypatch.setattr(quant_linear, "TILE_BYTES_1_THREAD", 2 * 1024 * 48)
    _check(q, x)


@pytest.mark.parametrize("kind", KINDS)
def test_native_dequantize_rows_is_the_reference_in_bf16(kind):
    q = _layer(kind, 20, 512, "native", seed=5)
    out = torch.empty(12, 512, dtype=torch.bfloat16)
    quant_native.dequantize_rows(quant_native.native_lib(), kind, q._k, 4, 16, None, out)
    ref = q.dequantize(torch.float32)[4:16]
    # the reference rounded to bf16; the kernel may fuse the multiply-add (one rounding less): 1 bf16 ulp
    assert torch.allclose(out.float(), ref.to(torch.bfloat16).float(), rtol=2**-7, atol=0)


def test_fused_mixed_kquant_projections():
    """gate/up of one kind fuse into one GEMV whose rows equal the separate layers; mixed kinds do not fuse."""
    a, b = _layer("q4_k", 24, 512, "native", seed=1), _layer("q4_k", 40, 512, "native", seed=2)
    x = torch.randn(1, 512, dtype=torch.bfloat16)
    ya, yb = a(x), b(x)
    fused = fuse_quantized([a, b])
    assert fused is not None
    torch.testing.assert_close(fused(x), torch.cat([ya, yb], dim=1), atol=0, rtol=0)
    assert fuse_quantized([a, _layer("q6_k", 8, 512, "native")]) is None


def test_fused_q4_1_projections_and_native_kind_codes():
    """Q4_1 q/k/v fuse like the K-quants, and the one-call decoder gets the WK_* code of each block format."""
    from strata.layers.fusion import WEIGHT_KINDS, native_weight

    parts = [_layer("q4_1", n, 576, "native", seed=n) for n in (64, 32, 32)]
    x = torch.randn(1, 576, dtype=torch.bfloat16)
    ys = [p(x) for p in parts]
    fused = fuse_quantized(parts)
    torch.testing.assert_close(fused(x), torch.cat(ys, dim=1), atol=0, rtol=0)
    assert native_weight(fused)[0] == WEIGHT_KINDS["q4_1"] == 9 and native_weight(_layer("q8_0", 4, 64, "native"))[0] == 8
    assert native_weight(_layer("q5_0", 4, 64, "native"))[0] == 10 and native_weight(_layer("q5_1", 4, 64, "native"))[0] == 11


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("kind", list(ggml_blocks.BLOCK_BYTES))
def test_q32_float32_input_computes_in_float32(kind, backend):
    """The 32-weight blocks hold GGUF weights exactly, and with float32 input compute near float32 precision (the GEMV
    splits x into two bf16 halves): 1e-4 of the output scale, where bf16 activations are off by ~1e-2."""
    for width in (576, 608):  # 18 and 19 blocks per row: q4_1's and q5's GEMV take two blocks per step
        q = _layer(kind, 37, width, backend, seed=7, bias=True)
        w = q.dequantize(torch.float64)
        for rows in (1, 3, 5, 40):
            x = torch.randn(rows, width, dtype=torch.float32)
            ref = x.double() @ w.T + q.bias.double()
            y = q(x)
            assert y.dtype == torch.float32
            assert (y.double() - ref).abs().max() <= 1e-4 * ref.abs().max(), (width, rows)
            _check(q, x.bfloat16())
