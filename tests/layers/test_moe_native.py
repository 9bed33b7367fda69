"""The native MoE decode (cpu_moe.c through moe_native.py) against the Python expert loop it replaces."""

import pytest
import torch

from strata.layers.linear import bf16_lib
from strata.layers.mlp import MLP, MixtralExpert
from strata.layers.moe import SparseMoeBlock
from strata.layers.moe_native import NativeExperts, take_counts
from strata.layers.quant_linear import QuantLinear
from strata.models.registry import config_from_dict

needs_native = pytest.mark.skipif(bf16_lib() is None, reason="native kernels unavailable on this machine")


def _block(model_type="qwen3_moe", hidden=128, inter=96, experts=6, top_k=3, seed=0):
    arch = "MixtralForCausalLM" if model_type == "mixtral" else "Qwen3MoeForCausalLM"
    cfg = config_from_dict({"architectures": [arch], "model_type": model_type, "vocab_size": 32, "hidden_size": hidden,
                                 "intermediate_size": 2 * inter, "moe_intermediate_size": inter,
                                 "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "num_experts": experts, "num_local_experts": experts,
                                 "num_experts_per_tok": top_k, "norm_topk_prob": True})
    torch.manual_seed(seed)
    expert = (lambda: MixtralExpert(hidden, inter)) if model_type == "mixtral" else (lambda: MLP(hidden, inter))
    block = SparseMoeBlock(cfg, 0, expert, cast_weights=model_type != "mixtral")  # as MixtralForCausalLM
    for p in block.parameters():
        p.data = torch.randn_like(p) * 0.1
    return block.to(torch.bfloat16).eval().requires_grad_(False)


def _quantize_experts(block, fmt):
    for e in block.experts:
        gate, up, down = e._projections()
        names = [n for n, m in e.named_children() if m in (gate, up, down)]
        for n in names:
            setattr(e, n, QuantLinear.from_float(getattr(e, n), fmt, backend="native"))


def _fused_block(fmt, **shape):
    """_block(**shape) (default experts=6, top_k=3) with its experts in fmt, projections fused as the grouped call
    runs them."""
    block = _block(**{"experts": 6, "top_k": 3, **shape})
    if fmt != "bf16":
        _quantize_experts(block, fmt)
    for e in block.experts:
        e.fuse_projections()
    return block


def _both_paths(block, x):
    for e in block.experts:
        e.fuse_projections()
    native = block(x)
    assert block.__dict__.get("_native"), "the native path was not taken"
    block.__dict__["_native"] = False  # force the Python loop
    return native, block(x)


@needs_native
@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_bf16_experts_match_python_loop(model_type):
    block = _block(model_type)
    x = torch.randn(1, 128).bfloat16()
    native, python = _both_paths(block, x)
    assert native.dtype == torch.bfloat16 and native.shape == (1, 128)
    # same GEMV kernels; only SiLU's exp differs in the last fp32 bit, which can flip a bf16 rounding
    torch.testing.assert_close(native.float(), python.float(), atol=2e-2, rtol=2e-2)
    assert (native == python).float().mean() > 0.9


@needs_native
@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "int4-g32-asym", "fp8", "int8-nested-g32"])
def test_quantized_experts_match_python_loop(fmt):
    block = _block()
    _quantize_experts(block, fmt)
    x = torch.randn(1, 128).bfloat16()
    native, python = _both_paths(block, x)
    torch.testing.assert_close(native.float(), python.float(), atol=2e-2, rtol=2e-2)
    assert (native == python).float().mean() > 0.9


@needs_native
def test_not_taken_for_fp32_or_mixed_formats():
    mixed = _block()
    _quantize_experts(mixed, "int8")
    mixed.experts[0].down_proj = QuantLinear.from_float(torch.nn.Linear(96, 128), "int4-g32", backend="native")
    for e in mixed.experts:
        e.fuse_projections()
    mixed(torch.randn(1, 128).bfloat16())
    assert mixed.__dict__["_native"] is False


def _per_token(block, x):
    """Each token alone through the native call (the one-token path)."""
    return torch.cat([block(x[t : t + 1]) for t in range(x.shape[0])])


@needs_native
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4-g32", "int4-g32-asym", "fp8", "int8-nested-g32"])
def test_batch_grouped_by_expert_matches_tokens_alone(fmt):
    """A batch runs every routed expert once for all of its tokens; each token's output matches what it gets
    alone up to the last-bit rounding of the several-row GEMV kernels (bf16), or of bf16 weights where a quantized
    expert got more than 4 tokens (the GEMM, as the module path), and matches exactly where no expert is shared."""
    block = _fused_block(fmt)
    x = torch.randn(16, 128).bfloat16()
    take_counts()
    batch = block(x)
    counts = take_counts()
    assert counts == {"calls": 1, "assignments": 16 * 3, "expert_runs": len(block.route(x)[1].unique())}
    alone = _per_token(block, x)
    torch.testing.assert_close(batch.float(), alone.float(), atol=2e-2, rtol=2e-2)
    if fmt == "bf16":
        assert (batch == alone).float().mean() > 0.9
    block.top_k = 1  # two tokens on distinct experts: each expert runs the one-row kernel, as alone
    ids = block.route(x)[1]
    first, second = 0, int((ids[:, 0] != ids[0, 0]).nonzero()[0])
    pair = x[[first, second]]
    assert torch.equal(block(pair), _per_token(block, pair))


@needs_native
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4-g32", "int4-g32-asym", "fp8", "int8-nested-g32"])
def test_experts_with_many_tokens_run_once_and_agree_with_the_gemv(fmt):
    """With more than 4 tokens on an expert it runs once for all of them through the GEMM of quant_cpu_gemm.c:
    the outputs agree with two calls of 4 tokens each (the GEMVs) up to bf16 rounding; bf16 experts run the GEMM
    at any row count, whose sums for a row do not depend on the other rows: bit-equal to the halves."""
    block = _fused_block(fmt, hidden=256, inter=1024, experts=2, top_k=2)  # gate/up 2048 x 256: several GEMM tiles
    x = torch.randn(8, 256).bfloat16()
    once = block(x)  # 8 rows per expert
    halves = torch.cat([block(x[:4]), block(x[4:])])  # 4 rows per expert: the GEMVs
    assert (once.float() - halves.float()).abs().max() <= 1e-2 * halves.float().abs().max()  # ~2 bf16 ulps
    if fmt == "bf16":
        assert torch.equal(once, halves)


@needs_native
@pytest.mark.parametrize("fmt", ["bf16", "int4-g32"])
def test_experts_on_several_threads_give_the_one_thread_results(fmt):
    """With more than one thread the grouped call runs its experts on the threads, one expert per thread at a
    time (each expert's GEMVs then plain loops inside it): the same numbers as one thread, bit for bit."""
    block = _fused_block(fmt)
    x = torch.randn(16, 128).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = block(x)
        torch.set_num_threads(4)
        many = block(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def _slot_tensors(expert, names):
    """An expert's tensors as a tier slot holds them: one buffer, tensors back to back in `names` order."""
    tensors = [getattr(expert, n).weight.detach() for n in names]
    buf = torch.cat([t.flatten() for t in tensors])  # [sum of numels] bf16
    out, start = {}, 0
    for n, t in zip(names, tensors):
        out[f"{n}.weight"] = buf[start : start + t.numel()].view(t.shape)
        start += t.numel()
    return out


@needs_native
def test_experts_from_tier_slots_give_the_resident_results():
    """NativeExperts.from_slots (a tier provider's held slots) runs the same kernel on the same values as the
    resident table: bit-equal outputs; slots whose gate rows are not followed by the up rows are refused."""
    block = _block(experts=6, top_k=2)
    x = torch.randn(5, 128).bfloat16()  # a verification's rows
    weights, ids = block.route(x)
    used = ids.unique().tolist()
    held = {e: _slot_tensors(block.experts[e], ["down_proj", "gate_proj", "up_proj"]) for e in used}  # name order
    slots = NativeExperts.from_slots(block.experts[0], held, block.num_experts)
    for e in block.experts:
        e.fuse_projections()
    resident = NativeExperts.build(block.experts)
    w = weights.to(x.dtype)
    assert torch.equal(slots(x, w, ids), resident(x, w, ids))
    apart = {e: _slot_tensors(block.experts[e], ["gate_proj", "down_proj", "up_proj"]) for e in used}
    assert NativeExperts.from_slots(block.experts[0], apart, block.num_experts) is None
    mixtral = _block("mixtral")  # w1 (gate), w2 (down), w3 (up): the store's name order parts gate and up
    held = {0: _slot_tensors(mixtral.experts[0], ["w1", "w2", "w3"])}
    assert NativeExperts.from_slots(mixtral.experts[0], held, mixtral.num_experts) is None


@needs_native
@pytest.mark.parametrize("kind", ["q8_0", "q4_1"])
def test_gguf_block_experts_run_the_grouped_call(kind):
    """Experts kept as GGUF q8_0 / q4_1 blocks (scales inside the blocks, group size 0) run the grouped call;
    its tiling once divided by the group size and killed the process (SIGFPE)."""
    from tests.layers.test_quant_kquant import _layer

    block = _block()
    for i, e in enumerate(block.experts):
        e.gate_proj, e.up_proj = _layer(kind, 96, 128, "native", seed=i), _layer(kind, 96, 128, "native", seed=50 + i)
        e.down_proj = _layer(kind, 128, 96, "native", seed=100 + i)
    x = torch.randn(6, 128).bfloat16()
    native, python = _both_paths(block, x)
    scale = python.float().abs().max().item()  # random blocks: outputs far from unit size
    torch.testing.assert_close(native.float(), python.float(), atol=2e-2 * scale, rtol=2e-2)


@needs_native
@pytest.mark.parametrize("kind", ["q8_0", "q4_1", "int4-g32"])
def test_float32_tokens_run_the_grouped_call(kind):
    """A float32 model's quantized experts (a GGUF file at its default dtype): float32 tokens through
    moe_decode_batch_f32 give the float32 expert modules' outputs, one token or six: GGUF's blocks within float32
    rounding (both run the blocks' float32 GEMV), int4 within a bf16 rounding of SiLU's output (both round the
    activations to bf16 for its GEMV; the SiLUs' exp differ in the last float32 bit)."""
    from tests.layers.test_quant_kquant import _layer

    block = _block().float()
    if kind == "int4-g32":
        _quantize_experts(block, kind)
    else:
        for i, e in enumerate(block.experts):
            e.gate_proj = _layer(kind, 96, 128, "native", seed=i)
            e.up_proj = _layer(kind, 96, 128, "native", seed=50 + i)
            e.down_proj = _layer(kind, 128, 96, "native", seed=100 + i)
    take_counts()
    for rows in (1, 6):
        block.__dict__.pop("_native", None)
        x = torch.randn(rows, 128)
        native, python = _both_paths(block, x)
        assert native.dtype == torch.float32 and native.shape == (rows, 128)
        scale = python.abs().max().item()
        tol = 2e-2 if kind == "int4-g32" else 1e-5
        torch.testing.assert_close(native, python, atol=tol * scale, rtol=tol)
    assert take_counts()["calls"] == 2  # one grouped call per forward
