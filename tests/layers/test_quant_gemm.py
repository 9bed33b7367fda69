"""The native batched GEMM (quant_cpu_gemm.c, quant_native.gemm) against dequantize_weight + a float matmul, for
every format it serves: odd K (masked tails), N that leaves partial register blocks and tiles, 5..64 rows,
threaded splits, and QuantLinear's routing between the GEMV, the GEMM and dequantize + oneDNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from strata.layers import quant_linear, quant_native
from strata.layers.quant_linear import QuantLinear
from strata.quant import ggml_blocks, kquant
from strata.quant.format import dequantize_weight

pytestmark = pytest.mark.skipif(quant_native.native_lib() is None, reason="native kernels unavailable here")

# (format, in_features): formats Strata quantizes into, with K that is no multiple of the 32-element step
MADE = [("int8", 100), ("int8", 288), ("fp8", 77), ("fp8", 96), ("int4-g32", 200), ("int4-g64-asym", 130),
        ("int4-g128", 576), ("int8-nested-g64", 150)]
BLOCKS = [("q8_0", 96), ("q4_1", 576), ("q5_0", 160), ("q5_1", 64), ("q4_k", 512), ("q5_k", 256), ("q6_k", 256)]
ROWS = (5, 7, 16, 33, 64)


def _layer(fmt: str, out: int, inp: int, seed: int = 0, bias: bool = False) -> QuantLinear:
    torch.manual_seed(seed)
    if fmt in kquant.BLOCK_BYTES or fmt in ggml_blocks.BLOCK_BYTES:
        q = QuantLinear(inp, out, fmt, bias=bias)
        q.qweight = (kquant if fmt in kquant.BLOCK_BYTES else ggml_blocks).random_blocks(fmt, out, inp, seed=seed)
        if bias:
            q.bias = torch.randn(out, dtype=torch.bfloat16)
        q.post_load("native")
        return q
    return QuantLinear.from_float(nn.Linear(inp, out, bias=bias), fmt, backend="native")


def _gemm(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    kp = q.fmt.padded_in(q.in_features)
    xp = torch.nn.functional.pad(x, (0, kp - q.in_features)).contiguous()
    return quant_native.gemm(quant_native.native_lib(), q.fmt.kind, xp, q._k, q.out_features, q.fmt.group_size,
                             q._k["bias"])


def _check_float(q: QuantLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y against the float32 reference weight (bf16 weights, activations and output: ~2^-8 of the output scale);
    returns the weight."""
    w = dequantize_weight(q._tensors(), q.fmt, q.out_features, q.in_features, dtype=torch.float32)
    ref = x.float() @ w.T + (0 if q.bias is None else q.bias.float())  # [M, N]
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert (y.float() - ref).abs().max() <= 1e-2 * ref.abs().max()
    return w


def _check(q: QuantLinear, x: torch.Tensor, y: torch.Tensor) -> None:
    """_check_float, and against the same weights in bf16, as the kernel dequantizes them: only the order of fp32
    sums and the output's rounding differ, so each element is within a bf16 ulp or two of its reference."""
    w = _check_float(q, x, y)
    bias = 0 if q.bias is None else q.bias.float()
    if q.fmt.kind == "fp8" and x.shape[0] <= q.gemv_max_rows or quant_native.isa() == "avx2" and (
            quant_native.avx2_own_gemv(q.fmt.kind, q.fmt.group_size, q.in_features)):
        # kernels that keep these weights exact (the fp8 GEMVs: codes exact in bf16, the row scale after the sum; on
        # AVX2 the kernels of quant_native.avx2_own_gemv at any row count): besides the output's bf16 rounding and
        # the order of sums, the int16 kernel rounds each x value to 16 bits of its run's largest value (at most
        # 2^-16 of it, bounded here by the row's)
        ref, scale = x.float() @ w.T + bias, x.float().abs() @ w.abs().T
        xq = 2**-16 * x.float().abs().amax(dim=1, keepdim=True) * w.abs().sum(dim=1)  # [M, N]
        assert ((y.float() - ref).abs() <= 2**-8 * ref.abs() + 1e-5 * scale + xq + 1e-30).all()
        return
    # the AVX-512 kernels either round each weight to bf16 before the dot products or multiply exact codes by the
    # block's scale after them (the one-row GEMVs of the GGUF blocks, the K-quants, int4, int8): with an outlier in
    # x the two differ by more than the bound, so the whole call must be within it of one of the two weights
    fits = []
    for wr in (w.to(torch.bfloat16).float(), w):
        ref = x.float() @ wr.T + bias
        scale = x.float().abs() @ wr.abs().T  # what the sum's rounding errors scale with
        fits.append(bool(((y.float() - ref).abs() <= 2**-7 * ref.abs() + 1e-5 * scale + 1e-30).all()))
    assert any(fits)


@pytest.mark.parametrize("fmt,inp", MADE + BLOCKS)
def test_gemm_matches_dequantized_reference(fmt, inp):
    q = _layer(fmt, 37, inp, bias=True)  # 37 rows: 4-row blocks and a remainder of 1
    for rows in ROWS:
        x = torch.randn(rows, inp).to(torch.bfloat16)
        _check(q, x, _gemm(q, x))


@pytest.mark.parametrize("fmt,inp", [b for b in BLOCKS if b[0] in quant_native.BLOCK32_KINDS] + [("q4_1", 1536)]
                         + [m for m in MADE if m[0].startswith("int4")] + [("int8", 288), ("fp8", 96), ("fp8", 77)]
                         + [b for b in BLOCKS if b[0] in kquant.BLOCK_BYTES] + [("q6_k", 768)])
def test_decode_rows_match_dequantized_reference(fmt, inp):
    """The GEMV rows of GGUF's blocks and K-quants, int4, int8 and fp8 through the decode fast path (1-4 rows; on AVX2
    the int16-activation kernel), with partial 4-row weight blocks and K that ends inside a run of 256 activations."""
    q = _layer(fmt, 37, inp, bias=True)
    for rows in range(1, q.gemv_max_rows + 1):
        x = torch.randn(rows, inp).to(torch.bfloat16)
        x[:, inp // 3] *= 100  # one outlier per row, as in the activations of real models
        _check(q, x, q(x))


@pytest.mark.parametrize("fmt,inp", [b for b in BLOCKS if b[0] in quant_native.BLOCK32_KINDS] + [("q4_1", 1536)]
                         + [m for m in MADE if m[0].startswith("int4")] + [("int8", 288)]
                         + [b for b in BLOCKS if b[0] in kquant.BLOCK_BYTES])
@pytest.mark.parametrize("rows", [7, 8, 13, 17])
def test_batch_rows_with_outliers(fmt, inp, rows):
    """Batches of 7-17 rows (on AVX2 the int16 kernel's 8-row groups: one x scale per row and run of 256 values,
    rows past M padded) where every other row has an outlier in a different run: each row's scales must stay its own."""
    q = _layer(fmt, 37, inp, bias=True)
    x = torch.randn(rows, inp).to(torch.bfloat16)
    for m in range(0, rows, 2):
        x[m, (97 * m) % inp] *= 100
    y = _gemm(q, x) if rows > q.gemv_max_rows else q(x)
    _check(q, x, y)


@pytest.mark.parametrize("fmt,inp", [m for m in MADE if m[0].startswith("int4")] + [("q4_1", 576), ("q8_0", 96)])
def test_float32_rows_are_the_exact_weights(fmt, inp):
    """dequantize_rows_f32 (the float32 tiles without AVX-512 BF16): int4 and the GGUF blocks to float32 exactly as
    the reference dequantizes them, for a row range inside the weight (padded K for int4)."""
    q = _layer(fmt, 37, inp)
    w = dequantize_weight(q._tensors(), q.fmt, q.out_features, q.in_features, dtype=torch.float32)
    kp = q.fmt.padded_in(q.in_features)
    out = torch.full((30, kp), float("nan"))
    quant_native.dequantize_rows_f32(quant_native.native_lib(), q.fmt.kind, q._k, 5, 35, out, q.fmt.group_size)
    assert torch.equal(out[:, :inp], w[5:35])


@pytest.mark.parametrize("threads", [1, 2])
def test_float32_input_rows_to_gemv_then_tiles(threads, monkeypatch):
    """float32 input to GGUF blocks: the native float32 GEMV up to _f32_gemv_max_rows rows (F32_GEMV_MAX_ROWS; on
    AVX2 more with several threads than with one), the exact float32 tiles beyond; both within float32 rounding of the float64
    product of the exact weight, and of each other."""
    q = _layer("q4_1", 37, 576)
    w = dequantize_weight(q._tensors(), q.fmt, q.out_features, q.in_features, dtype=torch.float64)
    calls = []
    for name in ("gemv_f32", "dequantize_rows_f32"):
        real = getattr(quant_native, name)
        monkeypatch.setattr(quant_native, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name),
                                                                                         _real(*a, **k))[1])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        limit = q._f32_gemv_max_rows()
        if quant_native.isa() == "avx2":
            assert limit == (quant_linear.AVX2_F32_GEMV_MAX_ROWS_1_THREAD if threads == 1
                             else quant_linear.AVX2_F32_GEMV_MAX_ROWS)
        else:
            assert limit == quant_linear.F32_GEMV_MAX_ROWS
        torch.manual_seed(3)
        x = torch.randn(limit + 1, 576)
        ys = {}
        for rows, path in ((limit, "gemv_f32"), (limit + 1, "dequantize_rows_f32")):
            calls.clear()
            ys[rows] = q(x[:rows])
            assert calls[0] == path, (rows, calls)
            want = x[:rows].double() @ w.T
            assert (ys[rows].double() - want).abs().max() <= 1e-5 * want.abs().max()
        torch.testing.assert_close(ys[limit], ys[limit + 1][:limit], rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("out", [1, 2, 3, 30, 301])
def test_gemm_row_tails_and_tiles(out):
    """N below one register block, between, and over several tiles (16 KiB of bf16 rows each) with a partial last."""
    q = _layer("q4_1", out, 576, seed=out)
    x = torch.randn(9, 576).to(torch.bfloat16)
    _check(q, x, _gemm(q, x))


def test_gemm_bf16_weight_in_place():
    """bf16 weights are read where they are (no copy), the last partial register block through the buffer."""
    torch.manual_seed(1)
    w = torch.randn(43, 100).to(torch.bfloat16)
    x = torch.randn(6, 100).to(torch.bfloat16)
    y = quant_native.gemm(quant_native.native_lib(), "bf16", x, {"qweight": w}, 43, None, None)
    torch.testing.assert_close(y.float(), (x.float() @ w.float().T).to(torch.bfloat16).float(), rtol=2**-7, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_threaded_split_agrees(threads):
    """A shape big enough for the tiles to be split across threads gives the same numbers as one thread."""
    q = _layer("int4-g32", 520, 1000, seed=2)
    x = torch.randn(24, 1000).to(torch.bfloat16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y = _gemm(q, x)
    finally:
        torch.set_num_threads(before)
    _check(q, x, y)
    torch.testing.assert_close(y, _gemm(q, x), rtol=0, atol=0)  # tiles are computed alike, whoever runs them


def test_quant_linear_routes_rows_to_gemv_gemm_and_dequantize(monkeypatch):
    """Up to gemv_max_rows: GEMV; up to gemm_max_rows: the GEMM; beyond: dequantize + oneDNN; mxfp4 has no GEMM."""
    q = _layer("q4_1", 64, 256)
    calls = []
    for name in ("gemv", "gemm", "dequantize_rows", "dequantize_rows_f32"):
        real = getattr(quant_native, name)
        monkeypatch.setattr(quant_native, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name),
                                                                                         _real(*a, **k))[1])
    q._gemv = None  # the bound decode fast path would skip quant_native.gemv
    cases = ((q.gemv_max_rows, "gemv"), (q.gemv_max_rows + 1, "gemm"), (q.gemm_max_rows, "gemm"),
             (q.gemm_max_rows + 1, "dequantize_rows"))
    if quant_native.isa() == "avx2":  # from AVX2_BLOCK32_FLOAT32_MIN_ROWS rows: float32 tiles in torch's matmul
        rows_f32 = quant_linear.AVX2_BLOCK32_FLOAT32_MIN_ROWS
        cases = ((q.gemv_max_rows, "gemv"), (q.gemv_max_rows + 1, "gemm"), (rows_f32 - 1, "gemm"),
                 (rows_f32, "dequantize_rows_f32"))
    for rows, path in cases:
        calls.clear()
        x = torch.randn(rows, 256).to(torch.bfloat16)
        _check_float(q, x, q(x))
        assert calls[0] == path, (rows, calls)
    if quant_native.isa() == "avx2":  # int8's float32 tiles start beyond gemm_max_rows: the GEMM up to there, never
        # the bf16 tiles (torch's bf16 matmul, slow without AVX-512); int4's float32 tiles are exact
        q8 = _layer("int8", 64, 256)
        assert quant_linear.AVX2_INT8_FLOAT32_MIN_ROWS > q8.gemm_max_rows + 1
        q4 = _layer("int4-g32", 64, 256)
        for q_, rows, path in ((q8, q8.gemm_max_rows + 1, "gemm"), (q8, quant_linear.AVX2_INT8_FLOAT32_MIN_ROWS,
                                                                   "dequantize_rows"),
                               (q4, quant_linear.AVX2_INT4_FLOAT32_MIN_ROWS - 1, "gemm"),
                               (q4, quant_linear.AVX2_INT4_FLOAT32_MIN_ROWS, "dequantize_rows_f32")):
            calls.clear()
            x = torch.randn(rows, 256).to(torch.bfloat16)
            _check_float(q_, x, q_(x))
            assert calls[0] == path, (q_.fmt, rows, calls)
    m = QuantLinear(64, 16, "mxfp4")
    g = torch.Generator().manual_seed(0)
    m.qweight = torch.randint(0, 256, (16, 32), generator=g, dtype=torch.uint8)
    m.scales = torch.randint(118, 131, (16, 2), generator=g, dtype=torch.uint8)
    m.post_load("native")
    calls.clear()
    m(torch.randn(8, 64).to(torch.bfloat16))
    assert calls[0] == "dequantize_rows"


def test_gemm_x_off_cache_line_boundaries():
    """x rows that do not start on 64-byte boundaries (a view one element in) give the aligned rows' results."""
    q = _layer("q4_1", 40, 576)
    x = torch.randn(7, 576).to(torch.bfloat16)
    shifted = torch.empty(7 * 576 + 1, dtype=torch.bfloat16)[1:].view(7, 576)  # [7, 576], 2 bytes off
    shifted.copy_(x)
    assert shifted.data_ptr() % 64 != 0
    torch.testing.assert_close(_gemm(q, shifted), _gemm(q, x), rtol=0, atol=0)
