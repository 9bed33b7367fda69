"""Miss fallbacks (--miss-fallback renormalize / lowbit) on the bundled Shakespeare MoE: generation runs and
counts its fallbacks; one MoE step equals a direct computation over the renormalized subset of experts, or
over the int4-g64 dequantized experts. ("none" is exact: tests/tiers/test_offload.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from strata import LLM
from strata.config import EngineConfig
from strata.engine.llm_engine import BUNDLED_MODEL
from strata.engine.sampling_params import SamplingParams
from strata.layers.quant_linear import QuantLinear, swap_linears
from strata.models.registry import load_config
from strata.quant.format import dequantize_weight, nested_int4_view, quantize_weight
from strata.tiers import runtime
from strata.tiers.lowbit import LOWBIT_FORMAT, lowbit_expert
from strata.tiers.store_convert import checkpoint_facts

pytestmark = pytest.mark.usefixtures("one_thread", "isolated")
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def budget_for(num_slots: int, lowbit: bool = False) -> int:
    facts = checkpoint_facts(BUNDLED_MODEL)
    cfg = load_config(BUNDLED_MODEL)
    plan = runtime._plan(BUNDLED_MODEL, EngineConfig(memory_budget=1 << 40), cfg, torch.float32, facts, lowbit)
    return plan.fixed_bytes + num_slots * facts.slot_bytes


def tiered(fallback: str, slots: int = 4) -> LLM:
    return LLM(BUNDLED_MODEL, progress=False, dtype="float32", miss_fallback=fallback,
               memory_budget=budget_for(slots, fallback == "lowbit"))


@pytest.fixture(scope="module")
def resident():
    return LLM(BUNDLED_MODEL, progress=False, dtype="float32").engine.model.moe_blocks()


def route(block, x):
    w, ids = block.route(x)  # [1, k] each
    return w[0], ids[0].tolist()


def test_renormalize_generates_and_counts():
    llm = tiered("renormalize")
    out = llm.generate(["ROMEO:"], GREEDY)[0].outputs[0].token_ids
    st = llm.engine.tier_stats()
    assert len(out) == 12
    assert st["miss_fallback"] == "renormalize" and st["fallback_renormalized"] > 0
    assert st["fallback_lowbit"] == 0 and st["disk_bytes_read"] > 0


def test_renormalize_step_uses_the_served_subset(resident):
    llm = tiered("renormalize")
    blocks = llm.engine.model.moe_blocks()
    cache = blocks[0].expert_provider.cache
    torch.manual_seed(0)
    x = torch.randn(1, blocks[0].gate.in_features)
    w, (e1, e2) = route(blocks[0], x)
    with cache.hold(blocks[0].layer_idx, e1):  # e1 resident, e2 a miss
        pass
    before = cache.stats.fallback_renormalized
    with torch.inference_mode():
        y = blocks[0](x)
    assert cache.stats.fallback_renormalized == before + 1
    assert cache.is_resident(blocks[0].layer_idx, e2)  # its read started in the background
    ref = resident[0].experts
    with torch.inference_mode():
        want = ref[e1](x) * (w[0] * (w.sum() / w[0]))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)

    # a token whose experts all miss (layer 1 has nothing resident) waits for its first choice
    w, (f1, _) = route(blocks[1], x)
    before = cache.stats.fallback_renormalized
    with torch.inference_mode():
        y = blocks[1](x)
        want = resident[1].experts[f1](x) * (w[0] * (w.sum() / w[0]))
    assert cache.stats.fallback_renormalized == before + 1  # f2 skipped; f1 computed exactly
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


def test_lowbit_step_equals_dequantized_experts(resident, monkeypatch):
    monkeypatch.setenv("STRATA_QUANT_BACKEND", "reference")  # float32 F.linear on the dequantized weight
    llm = tiered("lowbit")
    assert llm.engine.tiers.plan.lowbit_bytes == checkpoint_facts(BUNDLED_MODEL).lowbit_bytes > 0
    block = llm.engine.model.moe_blocks()[2]
    cache = block.expert_provider.cache
    torch.manual_seed(1)
    x = torch.randn(1, block.gate.in_features)
    w, ids = route(block, x)
    with torch.inference_mode():
        y = block(x)
        want = torch.zeros_like(x)
        for j, e in enumerate(ids):  # both miss: both run from the int4-g64 copy
            expert = resident[2].experts[e]
            g, u, d = (dequantize_weight(quantize_weight(p.weight, LOWBIT_FORMAT), LOWBIT_FORMAT, *p.weight.shape)
                       for p in (expert.gate_proj, expert.up_proj, expert.down_proj))
            want += F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d) * w[j]
    assert cache.stats.fallback_lowbit == 2
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    assert all(cache.is_resident(block.layer_idx, e) for e in ids)  # full-precision reads started

    out = llm.generate(["ROMEO:"], GREEDY)[0].outputs[0].token_ids
    st = llm.engine.tier_stats()
    assert len(out) == 12 and st["fallback_lowbit"] > 2 and st["fallback_renormalized"] == 0


def test_lowbit_of_nested_int8_is_its_int4_view(resident):
    proto = resident[0].experts[0]
    nested = "int8-nested-g64"
    tensors = {}
    for name, p in proto.named_parameters():
        for suffix, t in quantize_weight(p.detach(), nested).items():
            tensors[name.replace("weight", suffix)] = t
    with torch.device("meta"):
        meta = type(proto)(proto.gate_proj.in_features, proto.gate_proj.out_features)
    swap_linears(meta, {n: nested for n in ("gate_proj", "up_proj", "down_proj")})
    low = lowbit_expert(meta, tensors, torch.float32)
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(low, name)
        view, fmt = nested_int4_view({s: tensors[f"{name}.{s}"] for s in ("qweight", "scales")}, nested)
        assert isinstance(lin, QuantLinear) and lin.fmt == fmt
        assert torch.equal(lin.qweight, view["qweight"]) and torch.equal(lin.scales, view["scales"])
