"""The bf16 decode GEMV (quant_cpu_gemv16.c) and the prompt split (oneDNN + gemm_dq) against a float64 reference,
and the dispatch in layers/linear.py."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from strata.layers import linear as linear_mod
from strata.layers.fusion import fuse
from strata.layers.linear import Linear, bf16_lib, linear
from strata.layers.quant_linear import QuantLinear, swap_linears

needs_native = pytest.mark.skipif(bf16_lib() is None, reason="native bf16 GEMV unavailable on this machine")


def _ref(x, w, b=None):
    y = x.double() @ w.double().T  # [M, N]
    return y if b is None else y + b.double()


def _check(y, ref):
    # one bf16 rounding of the output (rel. 2^-8) plus fp32 accumulation in some order
    tol = ref.abs() * 2**-8 + 1e-5 * (1 + ref.abs().max())
    assert ((y.double() - ref).abs() <= tol).all()


@needs_native
@pytest.mark.parametrize("k,n", [(172, 37), (160, 38), (160, 39), (2049, 37), (172, 5632), (2049, 5632), (64, 4),
                                 (31, 1)])  # N % 4: blocks of 4 weight rows end in 1, 2 or 3
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 17, 64])
def test_kernel_matches_float64(k, n, m):
    g = torch.Generator().manual_seed(k * 31 + n + m)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    _check(linear(x, w), _ref(x, w))


@needs_native
def test_kernel_bias_fp32_output_and_leading_dims():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 300, generator=g).bfloat16()  # [B, T, K]: leading dims flattened to 2 rows
    w = torch.randn(70, 300, generator=g).bfloat16()
    b = torch.randn(70, generator=g).bfloat16()
    y = linear(x, w, b)
    assert y.shape == (2, 1, 70) and y.dtype == torch.bfloat16
    _check(y.reshape(2, 70), _ref(x.reshape(2, 300), w, b))
    out = torch.empty(2, 70)
    x2 = x.reshape(2, 300)
    bf = b.float()
    bf16_lib().gemv_bf16(x2.data_ptr(), 2, 300, w.data_ptr(), 70, bf.data_ptr(), out.data_ptr(), 1)
    ref = _ref(x2, w, b)
    assert ((out.double() - ref).abs() <= 1e-5 * (1 + ref.abs())).all()


def test_falls_back_to_f_linear(monkeypatch):
    calls = []
    real = F.linear
    monkeypatch.setattr(linear_mod.F, "linear", lambda *a: calls.append(a[0].shape) or real(*a))
    w = torch.randn(8, 16)
    linear(torch.randn(1, 16), w)  # fp32
    linear(torch.randn(9, 16).bfloat16().requires_grad_(), w.bfloat16())  # autograd
    linear(torch.randn(1, 16).bfloat16(), w.bfloat16().t().contiguous().t()[:, :16])  # non-contiguous weight
    assert calls == [(1, 16), (9, 16), (1, 16)]
    calls.clear()
    linear(torch.randn(8, 16).bfloat16(), w.bfloat16())  # a verification of 7 drafts: one pass of the GEMM
    linear(torch.randn(63, 16).bfloat16(), w.bfloat16())  # a batch of decodes: the native GEMM
    linear(torch.randn(70, 16).bfloat16(), w.bfloat16())  # a prompt: oneDNN's matmul and the native GEMM
    expected = [] if bf16_lib() is not None else [(8, 16), (63, 16), (70, 16)]
    if bf16_lib() is not None and linear_mod._avx2():  # beyond the GEMV's rows: torch's float32 matmul
        expected = [(63, 16), (70, 16)]
    assert calls == expected


def test_env_switch_disables_native(monkeypatch):
    monkeypatch.setenv("STRATA_NATIVE_BF16", "0")
    bf16_lib.cache_clear()
    try:
        assert bf16_lib() is None
        x, w = torch.randn(1, 16).bfloat16(), torch.randn(8, 16).bfloat16()
        assert torch.equal(linear(x, w), F.linear(x, w))
    finally:
        monkeypatch.delenv("STRATA_NATIVE_BF16")
        bf16_lib.cache_clear()


def test_linear_module_is_an_nn_linear():
    lin = Linear(16, 8, bias=True)
    assert isinstance(lin, nn.Linear) and set(lin.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 16)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    a, b = Linear(16, 8, bias=False), Linear(16, 4, bias=False)
    w, _ = fuse([a, b])
    assert w.shape == (12, 16) and a.weight.data_ptr() == w.data_ptr()


def test_swap_linears_finds_linear():
    model = nn.Module()
    model.proj = Linear(64, 32, bias=False)
    swap_linears(model, {"proj": "int8"})
    assert isinstance(model.proj, QuantLinear)


@needs_native
@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])  # tied lm_head; qkv bias, MoE router, shared expert
def test_bf16_decode_matches_f_linear_path(tmp_path, monkeypatch, family):
    pytest.importorskip("transformers")
    from strata.layers.attention import AttentionMetadata
    from strata.weights.loader import load_model
    from tests.models.conftest import build_hf

    build_hf(family, tmp_path, dtype=torch.bfloat16)
    model = load_model(str(tmp_path), progress=False)
    assert model.lm_head.weight.dtype == torch.bfloat16
    cfg = model.config
    ids = torch.randint(3, cfg.vocab_size, (6,), generator=torch.Generator().manual_seed(0))

    def decode():  # token by token through the KV cache, so every projection sees one row
        shape = (8, cfg.num_key_value_heads, cfg.head_dim)
        caches = [(torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))
                  for _ in range(cfg.num_hidden_layers)]
        slots, out = torch.arange(8), []
        for t in range(len(ids)):
            meta = AttentionMetadata([0], [1], [t + 1], slots[t : t + 1], [slots[: t + 1]])
            out.append(model(ids[t : t + 1], torch.tensor([t]), meta, caches))
        return torch.cat(out)  # [T, V]

    lib = bf16_lib()
    calls = []

    class Counting:  # the tiny model's weights take the GEMV, the same rows through the GEMM the larger ones
        def gemm_dq(self, *a):
            calls.append(a[2])
            lib.gemm_dq(*a)

        def gemv_bf16(self, *a):
            calls.append(a[1])
            lib.gemv_bf16(*a)

    monkeypatch.setattr(linear_mod, "bf16_lib", lambda: Counting())
    native = decode()
    assert calls and set(calls) == {1}
    monkeypatch.setattr(linear_mod, "bf16_lib", lambda: None)
    ref = decode()
    torch.testing.assert_close(native, ref, atol=0.1, rtol=0.05)  # bf16 roundings in a different order
    assert (native.argmax(-1) == ref.argmax(-1)).all()


def _gemv_f32(x, w):
    y = torch.empty(x.shape[0], w.shape[0])  # [M, N] fp32: the sums before any bf16 rounding hides their order
    bf16_lib().gemv_bf16(x.data_ptr(), x.shape[0], x.shape[1], w.data_ptr(), w.shape[0], None, y.data_ptr(), 1)
    return y


@needs_native
@pytest.mark.parametrize("m", [6, 8, 16])
def test_kernel_rows_past_four_match_their_own_pass(m):
    # a pass of 5..8 rows runs rows 0..3, then the others, against the same weight rows: each group of 2..4 rows
    # sums exactly as a call with that group alone, bit for bit
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 160, generator=g).bfloat16()
    w = (torch.randn(516, 160, generator=g) * 0.05).bfloat16()  # 129 whole blocks of 4 weight rows
    y = _gemv_f32(x, w)
    for lo in range(0, m, 4):
        assert torch.equal(y[lo : lo + 4], _gemv_f32(x[lo : lo + 4].contiguous(), w))
    _check(y, _ref(x, w))


class _CountingLib:
    """bf16_lib() stand-in recording the rows each native kernel gets."""

    def __init__(self):
        self.lib, self.gemv, self.gemm = bf16_lib(), [], []

    def gemv_bf16(self, *a):
        self.gemv.append(a[1])
        self.lib.gemv_bf16(*a)

    def gemm_dq(self, *a):
        self.gemm.append(a[2])
        self.lib.gemm_dq(*a)


@needs_native
@pytest.mark.parametrize("m", [9, 63, 64, 65, 150, 200])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n", [300, 1700])  # [n, 160] bf16: 94 KiB, in L2; 531 KiB, above SPLIT_MAX_BYTES
def test_prompt_rows_split_between_onednn_and_native_gemm(monkeypatch, m, bias, n):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 160, generator=g).bfloat16()
    w = (torch.randn(n, 160, generator=g) * 0.05).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    lib = _CountingLib()
    monkeypatch.setattr(linear_mod, "bf16_lib", lambda: lib)
    y = linear(x, w, b)
    chunk = linear_mod.CHUNK_ROWS
    if linear_mod._avx2():  # the AVX2 build: its GEMV up to its rows, beyond torch's float32 matmul
        assert lib.gemv == ([m] if linear_mod.native_rows(m, n, 160) else []) and lib.gemm == []
    elif m <= linear_mod.GEMV_BF16_MAX_ROWS and w.numel() * 2 <= linear_mod.GEMV_BF16_MAX_BYTES:
        assert lib.gemv == [m] and lib.gemm == []  # a few rows of a cached weight: the GEMV
    else:
        rest = m if m < chunk else m % chunk if w.numel() * 2 <= linear_mod.SPLIT_MAX_BYTES else 0
        assert lib.gemv == [] and lib.gemm == ([rest] if rest else [])  # oneDNN got the rest
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    _check(y, _ref(x, w, b))


@pytest.mark.skipif(bf16_lib() is None, reason="native kernels unavailable on this machine")
def test_small_weights_take_the_gemv_large_ones_the_gemm():
    """Up to 16 rows a weight of at most GEMV_BF16_MAX_BYTES (kept in cache between steps: the GEMV is faster
    there) runs gemv_bf16, a larger one or more rows the GEMM (faster from memory, or once the GEMV would pass
    over the weight three times); the result is that kernel's, bit for bit. The AVX2 build runs its GEMV up to
    native_rows and torch's float32 matmul beyond."""
    lib = bf16_lib()
    cases = [((64, 32), m, "gemv") for m in (1, 3, 8, 9, 16)] + [((64, 32), 17, "gemm")] + \
        [((1024, 520), m, "gemm") for m in (1, 3, 8, 16)]  # 4 KiB; 1.04 MiB > GEMV_BF16_MAX_BYTES
    for (n, k), m, kernel in cases:
        w, x = torch.randn(n, k).bfloat16(), torch.randn(m, k).bfloat16()
        want = torch.empty(m, n, dtype=torch.bfloat16)
        if linear_mod._avx2():
            kernel = "gemv" if linear_mod.native_rows(m, n, k) else "float32"
        if kernel == "float32":
            want = (x.float() @ w.float().t()).bfloat16()
        elif kernel == "gemv":
            lib.gemv_bf16(x.data_ptr(), m, k, w.data_ptr(), n, None, want.data_ptr(), 0)
        else:
            lib.gemm_dq(0, x.data_ptr(), m, k, w.data_ptr(), None, None, n, 0, None, want.data_ptr())
        assert torch.equal(linear(x, w), want), (n, k, m)
        ref = x.double() @ w.double().t()
        assert ((want.double() - ref).abs() <= 1e-2 * (1 + ref.abs())).all()
