"""Int8-activation kernels (quant_cpu_a8.c through quant_native.gemm_a8) and --quantized-activations: every
format against a float64 reference on the dequantized weight and the int8-quantized activations (tight), and
against the unquantized activations (loose); odd shapes, row chunks, 1 and 2 threads; QuantLinear's routing;
greedy SmolLM2 with the option on against the same model fed the quantized activations by hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from strata.config import EngineConfig
from strata.errors import ConfigError
from strata.layers import quant_native
from strata.layers.quant_linear import QuantLinear, set_quantized_activations
from strata.quant import ggml_blocks, kquant
from strata.quant.activations import block_for, fake_quantize_rows
from strata.quant.format import dequantize_weight

LIB = quant_native.native_lib()
# format, in_features: widths that leave a half step (int4-g32: 224 = 3.5 steps), a partial block (int8: 100),
# and wide rows (576 to 1100: 9 to 18 steps)
FORMATS = [("int4-g32", 200), ("int4-g64-asym", 320), ("int4-g128", 256), ("int8-nested-g64", 192),
           ("int8", 100), ("q8_0", 96), ("q4_1", 160), ("q4_k", 512), ("q5_k", 512), ("q6_k", 768),
           ("int4-g32", 1088), ("int4-g64-asym", 1024), ("int8-nested-g64", 576), ("int8", 1100), ("q8_0", 1024),
           ("q4_1", 576)]


def _layer(fmt: str, out: int, inp: int, bias: bool = False, seed: int = 0) -> QuantLinear:
    q = QuantLinear(inp, out, fmt, bias=bias)
    if q.fmt.kind in kquant.BLOCK_BYTES:
        q.qweight = kquant.random_blocks(q.fmt.kind, out, inp, seed=seed)
    elif q.fmt.kind in ggml_blocks.BLOCK_BYTES:
        q.qweight = ggml_blocks.random_blocks(q.fmt.kind, out, inp, seed=seed)
    else:
        g = torch.Generator().manual_seed(seed)
        lin = torch.nn.Linear(inp, out, bias=False)
        lin.weight.data = torch.randn(out, inp, generator=g) * 0.05
        q = QuantLinear.from_float(lin, fmt, backend="native")
        if bias:
            q = QuantLinear(inp, out, fmt, bias=True)
            for name, t in QuantLinear.from_float(lin, fmt)._tensors().items():
                setattr(q, name, t)
    if bias:
        q.bias = torch.randn(out, dtype=torch.bfloat16)
    q.post_load("native")
    if not q._a8:
        pytest.skip("no int8-activation kernel here (needs AVX-512 VNNI and the native library)")
    return q


def _weight(q: QuantLinear) -> torch.Tensor:
    return dequantize_weight(q._tensors(), q.fmt, q.out_features, q.in_features, dtype=torch.float64)


def _a8(q: QuantLinear, x: torch.Tensor, out_dtype=torch.float32) -> torch.Tensor:
    xp = F.pad(x, (0, q.fmt.padded_in(q.in_features) - q.in_features)).contiguous()
    return quant_native.gemm_a8(LIB, q.fmt.kind, xp, q._k, q.out_features, q.fmt.group_size, q._k["bias"], out_dtype)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt,inp", FORMATS)
def test_matches_int8_activation_reference(fmt, inp, threads):
    q = _layer(fmt, 37, inp, bias=True)  # 37 rows: whole 4-row tiles and a remainder, not a multiple of 16
    w, b = _weight(q), q.bias.double()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 5, 70):  # one row, a partial register block, many blocks (threaded above 2^18 bytes)
            for dtype in (torch.bfloat16, torch.float32):
                x = torch.randn(rows, inp).to(dtype)
                ref = fake_quantize_rows(x.float(), block_for(q.fmt.kind)).double() @ w.T + b
                exact = x.double() @ w.T + b
                scale = ref.abs().max()
                y = _a8(q, x)
                assert (y.double() - ref).abs().max() <= 2e-6 * scale  # same codes, float32 sums
                assert (y.double() - exact).abs().max() <= 3e-2 * scale  # int8 activations: ~1% of the output
                yb = _a8(q, x, torch.bfloat16)
                assert (yb.double() - ref).abs().max() <= 2 ** -8 * scale
    finally:
        torch.set_num_threads(before)


def test_row_chunks_and_wide_rows():
    """More rows than one pass keeps in cache (256) and more output rows than threads' tiles."""
    q = _layer("q4_k", 301, 256, seed=2)
    x = torch.randn(300, 256)
    ref = fake_quantize_rows(x, 256).double() @ _weight(q).T
    assert (_a8(q, x).double() - ref).abs().max() <= 2e-6 * ref.abs().max()


def test_zero_rows_and_blocks():
    """All-zero activation blocks have scale 0 (no division by zero) and contribute nothing."""
    q = _layer("int4-g32", 16, 128)
    x = torch.randn(6, 128)
    x[1] = 0
    x[:, 32:64] = 0
    y = _a8(q, x)
    ref = fake_quantize_rows(x).double() @ _weight(q).T
    assert torch.isfinite(y).all() and (y[1] == 0).all()
    assert (y.double() - ref).abs().max() <= 2e-6 * ref.abs().max()


def test_quant_linear_routes_batched_rows_only():
    q = _layer("q4_1", 40, 256, bias=True)
    x = torch.randn(9, 256, dtype=torch.bfloat16)
    base_small, base_big = q(x[:3]), q(x)
    q.quantized_activations = "int8"
    assert torch.equal(q(x[:3]), base_small)  # decode rows keep the bf16 GEMV
    y = q(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, _a8(q, x, torch.bfloat16))
    assert not torch.equal(y, base_big)
    x32 = x.float()
    y32 = q(x32)  # float32 in: float32 out, from the same kernel
    assert y32.dtype == torch.float32 and torch.equal(y32, _a8(q, x32))


def test_set_quantized_activations_reaches_fused_projections():
    from strata.layers.fusion import FusedProjection

    a, b = _layer("int4-g32", 8, 64), _layer("int4-g32", 8, 64, seed=1)
    fused = _layer("int4-g32", 16, 64, seed=2)
    model = torch.nn.ModuleDict({"a": a, "b": b})
    model.a.fused = FusedProjection(quant=fused)  # as attention/MLP hold them: outside the module tree
    assert set_quantized_activations(model, "int8") == 3
    assert fused.quantized_activations == a.quantized_activations == "int8"
    with pytest.raises(ConfigError, match="--quantized-activations"):
        set_quantized_activations(model, "fp8")
    with pytest.raises(ConfigError, match="--quantized-activations"):
        EngineConfig(quantized_activations="int4")


def _quant_layers(model) -> list[QuantLinear]:
    found = {id(m): m for m in model.modules() if isinstance(m, QuantLinear)}
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(getattr(v, "quant", None), QuantLinear):
                found[id(v.quant)] = v.quant
    return list(found.values())


def test_smollm2_greedy_with_int8_activations(smollm2_gguf, monkeypatch):
    """The option end to end on a real model: its greedy tokens equal the unquantized-activation engine's when
    hooks feed every batched quantized layer the fake-quantized activations (so the option changes exactly the
    activations, nothing else); prompts are longer than 4 tokens, so their prefill takes the int8 path."""
    from strata import LLM, SamplingParams

    if not quant_native.a8_available(LIB, "q4_1"):
        pytest.skip("no int8-activation kernel here")
    ours = LLM(str(smollm2_gguf), progress=False, num_threads=1, quantized_activations="int8")
    ref = LLM(str(smollm2_gguf), progress=False, num_threads=1)

    def fake(mod, args):
        x = args[0]
        x2 = x.reshape(-1, mod.in_features)
        if x2.shape[0] <= mod.gemv_max_rows:
            return None
        return (fake_quantize_rows(x2.float(), block_for(mod.fmt.kind)).to(x.dtype).reshape(x.shape),)

    for m in _quant_layers(ref.engine.model):
        m.register_forward_pre_hook(fake)
    tok = ours.tokenizer
    prompts = [tok.encode("The capital of France is"), tok.encode("def fibonacci(n):"),
               tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    calls = []
    kernel = quant_native.gemm_a8
    monkeypatch.setattr(quant_native, "gemm_a8", lambda *a: calls.append(a[1]) or kernel(*a))
    got = [o.outputs[0].token_ids for o in ours.generate(prompts, params)]
    assert "q4_1" in calls  # the prefill ran on the int8 kernel
    want = [o.outputs[0].token_ids for o in ref.generate(prompts, params)]
    assert got == want
