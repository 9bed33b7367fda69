"""The native MoE decode (cpu_moe.c through moe_native.py) against the Python expert loop it replaces."""

import pytest
import torch

from strata.layers.linear import bf16_lib
from strata.layers.mlp import MLP, MixtralExpert
from strata.layers.moe import SparseMoeBlock
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
def test_not_taken_for_prefill_fp32_or_mixed_formats():
    block = _block()
    for e in block.experts:
        e.fuse_projections()
    block(torch.randn(3, 128).bfloat16())  # prefill rows: the sorted dispatch, no native plan built
    assert "_native" not in block.__dict__
    mixed = _block()
    _quantize_experts(mixed, "int8")
    mixed.experts[0].down_proj = QuantLinear.from_float(torch.nn.Linear(96, 128), "int4-g32", backend="native")
    for e in mixed.experts:
        e.fuse_projections()
    mixed(torch.randn(1, 128).bfloat16())
    assert mixed.__dict__["_native"] is False
