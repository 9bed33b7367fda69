"""Steps above NATIVE_MAX_TOKENS rows: experts with few rows run in one native grouped call, the others through
their modules (dequantize + GEMM), against the per-expert module loop for every expert; a step whose experts all
have few rows goes to the grouped call whole."""

import pytest
import torch

from strata.layers.linear import bf16_lib
from strata.layers.moe import NATIVE_MAX_TOKENS
from strata.layers.moe_native import NATIVE_MAX_ROWS, NATIVE_ROWS, NATIVE_WORK, take_counts
from tests.layers.test_moe_native import _fused_block

needs_native = pytest.mark.skipif(bf16_lib() is None, reason="native kernels unavailable on this machine")


def _skewed_routing(rows: int, few: int, experts: int):
    """Routing (weights [rows, 2] float32, ids [rows, 2]): every row's first choice is expert 0 (many rows);
    second choices give expert 1 exactly `few` rows, expert 2 `few` + 1, and spread the rest over experts 3.."""
    second = [1] * few + [2] * (few + 1)
    second += [3 + i % (experts - 3) for i in range(rows - len(second))]
    ids = torch.stack([torch.zeros(rows, dtype=torch.int64), torch.tensor(second)[torch.randperm(rows)]], dim=1)
    w = torch.rand(rows, 1) * 0.5 + 0.25
    return torch.cat([w, 1 - w], dim=1), ids


@needs_native
@pytest.mark.parametrize("fmt", ["bf16", "int4-g32", "int8"])
def test_split_matches_module_loop(fmt):
    block = _fused_block(fmt, experts=8, top_k=2)
    few = block._native_experts().max_rows
    kind = "bf16" if fmt == "bf16" else fmt.split("-")[0]
    assert few == max(NATIVE_ROWS[kind], min(NATIVE_MAX_ROWS, NATIVE_WORK.get(kind, 0) // (3 * 128 * 96)))
    rows = max(NATIVE_MAX_TOKENS + 6, 2 * few + 16)
    torch.manual_seed(1)
    weights, ids = _skewed_routing(rows, few, block.num_experts)
    block.routing_override = lambda _block, _logits: (weights, ids)
    x = torch.randn(rows, 128).bfloat16()
    counts = torch.bincount(ids.reshape(-1), minlength=block.num_experts).tolist()
    native_experts = [e for e, c in enumerate(counts) if 0 < c <= few]
    assert 1 in native_experts and 0 not in native_experts and 2 not in native_experts
    take_counts()
    split = block(x)
    assert take_counts() == {"calls": 1, "assignments": sum(counts[e] for e in native_experts),
                             "expert_runs": len(native_experts)}
    block.__dict__["_native"] = False  # every expert through its module
    loop = block(x)
    assert take_counts()["calls"] == 0
    # same weights, the grouped GEMVs against dequantize + GEMM: last-bit roundings only; a dropped or doubled
    # assignment moves its row by its expert's whole weighted output
    torch.testing.assert_close(split.float(), loop.float(), atol=2e-2, rtol=2e-2)
    assert (split - loop).abs().max() < 0.1 * loop.abs().max()


@needs_native
def test_prompt_with_few_rows_per_expert_runs_one_grouped_call():
    block = _fused_block("bf16", experts=8, top_k=2)  # hidden 128, intermediate 96
    rows = 3 * NATIVE_MAX_TOKENS
    torch.manual_seed(2)
    x = torch.randn(rows, 128).bfloat16()
    take_counts()
    whole = block(x)
    _, ids = block.route(x)
    counts = torch.bincount(ids.reshape(-1), minlength=block.num_experts)
    assert counts.max() <= block._native_experts().max_rows
    assert take_counts() == {"calls": 1, "assignments": rows * 2, "expert_runs": int((counts > 0).sum())}
    block.__dict__["_native"] = False
    loop = block(x)
    torch.testing.assert_close(whole.float(), loop.float(), atol=2e-2, rtol=2e-2)
    assert (whole - loop).abs().max() < 0.1 * loop.abs().max()
