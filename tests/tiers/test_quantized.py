"""Quantized checkpoints under --memory-budget: every format `strata quantize` writes runs with its experts
in the tiers, token for token as the resident run of the same checkpoint; the store and the cache hold the
quantized bytes (an int4 expert is about a quarter of a bf16 one), and the plan counts them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from strata import LLM
from strata.cli import main
from strata.engine.sampling_params import SamplingParams
from strata.layers.quant_linear import QuantLinear
from strata.quant.format import QuantFormat
from strata.tiers.budget import split_slots
from strata.tiers.store import ExpertStore, align
from strata.tiers.store_convert import checkpoint_facts, ensure_store
from tests.models.conftest import COMMON, save_tiny_tokenizer
from tests.tiers.conftest import budget_for

pytestmark = pytest.mark.usefixtures("one_thread", "isolated")
PROMPTS = [[1, 5, 9, 33, 70, 4, 18], [1, 200, 3]]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
LAYERS, EXPERTS, HIDDEN, INTER = 4, 16, 128, 128
FORMATS = ["int8", "int4-g64", "int4-g32-asym", "int8-nested-g64", "fp8"]


@pytest.fixture(scope="module")
def bf16_moe(tmp_path_factory):
    """A random Qwen3-MoE in bf16: 4 MoE layers of 16 experts, [128 -> 128 -> 128] each (96 KiB in bf16)."""
    path = tmp_path_factory.mktemp("qwen3moe-bf16")
    cfg = transformers.Qwen3MoeConfig(**{**COMMON, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
                                         "num_experts": EXPERTS, "num_experts_per_tok": 2, "head_dim": 32,
                                         "moe_intermediate_size": INTER, "norm_topk_prob": True,
                                         "decoder_sparse_step": 1})
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():  # spread logits: greedy paths without near-ties
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    save_tiny_tokenizer(path)
    return str(path)


def quantized(src: str, out, *args: str) -> str:
    assert main(["quantize", *args, "--method", "rtn", "--no-progress", src, str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def checkpoints(bf16_moe, tmp_path_factory):
    cache = {}

    def get(fmt: str) -> str:
        if fmt not in cache:
            out = tmp_path_factory.mktemp("q") / fmt
            if fmt == "mixed":  # the first half of each layer's experts hot (int8), the rest int4
                imp = out.parent / "importance.json"
                hot = {f"model.layers.{i}.mlp.experts.{e}": 10 if e < EXPERTS // 2 else 0.01
                       for i in range(LAYERS) for e in range(EXPERTS)}
                imp.write_text(json.dumps(hot))
                facts = checkpoint_facts(bf16_moe)
                budget = facts.non_expert_bytes + facts.expert_bytes * 3 // 8  # between all-int4 and all-int8
                cache[fmt] = quantized(bf16_moe, out, "--mixed", "--format", "int8,int4-g64", "--budget",
                                       str(budget), "--importance", str(imp))
            else:
                cache[fmt] = quantized(bf16_moe, out, "--format", fmt)
        return cache[fmt]

    return get


def generate(path: str, **kw) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, progress=False, dtype="float32", **kw)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)], llm


def expert_formats(path: str) -> dict[tuple[int, int], QuantFormat]:
    modules = json.loads((Path(path) / "config.json").read_text())["quantization_config"]["modules"]
    out = {}
    for name, f in modules.items():
        parts = name.split(".")
        if "experts" in parts:
            out[(int(parts[2]), int(parts[5]))] = QuantFormat.parse(f)
    return out


@pytest.mark.parametrize("fmt", [*FORMATS, "mixed"])
def test_offloaded_quantized_equals_resident(checkpoints, fmt):
    path = checkpoints(fmt)
    ref, resident = generate(path)
    assert resident.engine.tiers is None
    for slots, prefetch in ((12, "lookahead"), (8, "hybrid"), (5, "none")):
        out, llm = generate(path, memory_budget=budget_for(path, slots), prefetch=prefetch)
        st = llm.engine.tier_stats()
        assert st["tiered"] and st["expert_misses"] > 0
        if fmt == "mixed":  # int8 and int4 experts in slots of their own size: more slots than bf16-sized
            assert st["expert_cache_slots"] > slots and st["expert_cache_bytes"] <= slots * st["expert_slot_bytes"]
        else:
            assert st["expert_cache_slots"] == slots
        assert out == ref, f"{fmt} at {slots} slots"
        block = llm.engine.model.moe_blocks()[0]
        assert isinstance(block.experts[0].gate_proj, QuantLinear) and block.experts[0].gate_proj.qweight.is_meta
        llm.engine.tiers.close()


@pytest.mark.parametrize("fmt", [*FORMATS, "mixed"])
def test_store_holds_quantized_bytes(checkpoints, bf16_moe, fmt):
    path = checkpoints(fmt)
    formats = expert_formats(path)
    store = ExpertStore(ensure_store(path, progress=False))
    bf16 = ExpertStore(ensure_store(bf16_moe, progress=False))
    for key in store.entries:
        want = 2 * formats[key].nbytes(INTER, HIDDEN) + formats[key].nbytes(HIDDEN, INTER)  # gate, up, down
        e = store.entry(key)
        assert sum(t.nbytes for t in e.tensors) == want
        assert e.padded == align(e.length) and e.length < want + 64 * len(e.tensors)
        assert store.nbytes(key) <= align(want) + 4096  # what one read of it moves from disk
        assert store.nbytes(key) <= (0.34 if formats[key].bits == 4 else 0.55) * bf16.nbytes(key)


@pytest.mark.parametrize("fmt", ["int4-g64", "int8"])
def test_tight_budget_counts_quantized_slots(checkpoints, bf16_moe, fmt):
    """The plan sizes slots by the quantized expert: a budget of 6 quantized slots holds 6 of them (not the
    2 that bf16 sizes would give), the pool is exactly that big, and each read moves one quantized expert."""
    path = checkpoints(fmt)
    facts, bf16_facts = checkpoint_facts(path), checkpoint_facts(bf16_moe)
    assert facts.slot_bytes <= (0.3 if "int4" in fmt else 0.55) * bf16_facts.slot_bytes
    budget = budget_for(path, 6)
    _, llm = generate(path, memory_budget=budget)
    cache, plan = llm.engine.tiers.cache, llm.engine.tiers.plan
    assert cache.num_slots == 6 and cache.storage.numel() == 6 * facts.slot_bytes
    assert plan.fixed_bytes + cache.storage.numel() <= budget
    st = cache.stats
    assert st.disk_bytes_read == (st.misses + st.prefetch_issued) * facts.slot_bytes
    llm.engine.tiers.close()


def test_mixed_plan_keeps_each_expert_at_its_own_bits(checkpoints):
    """A --mixed plan (hot experts int8, cold int4): one pool per size, each slot the size of its experts,
    every class the same share of its experts; a resident expert sits in a slot of its own class."""
    path = checkpoints("mixed")
    formats = expert_formats(path)
    assert {f.bits for f in formats.values()} == {8, 4}
    facts = checkpoint_facts(path)
    assert len(facts.slot_classes) == 2
    (big, n_big), (small, n_small) = facts.slot_classes
    assert small < 0.6 * big and n_big + n_small == LAYERS * EXPERTS
    spare = 4 * big + 8 * small + small // 2
    _, llm = generate(path, memory_budget=budget_for(path, 0) + spare)
    cache, plan = llm.engine.tiers.cache, llm.engine.tiers.plan
    assert plan.class_bytes == [big, small] and sum(plan.class_slots) == cache.num_slots
    (s_big, s_small), size = plan.class_slots, cache.storage.numel()
    assert size == s_big * big + s_small * small and spare - small < size <= spare
    assert plan.budget_bytes - plan.fixed_bytes == spare
    assert plan.class_slots == split_slots(spare, list(facts.slot_classes), 2)  # the documented rule
    for key in cache.pools.resident_keys():
        slot = cache.pools.slot(key)
        assert (formats[key].bits == 8) == (slot < s_big) and cache.store.nbytes(key) == cache._slots[slot][1]
    st = cache.stats
    reads = st.misses + st.prefetch_issued
    assert reads * small < st.disk_bytes_read < reads * big  # each read moves its own expert's bytes
    llm.engine.tiers.close()


@pytest.mark.parametrize("fmt", ["int8-nested-g64", "int8", "mixed"])
def test_lowbit_fallback_keeps_cold_experts_at_int4(checkpoints, fmt):
    """--miss-fallback lowbit on a quantized store: hot experts in the cache at their stored bits, every expert
    resident as int4 (the int4 code inside an int8-nested byte, a requantized int8 expert, an int4 expert as
    it is), so the copies take exactly the bytes of an int4-g64 checkpoint's experts."""
    path = checkpoints(fmt)
    facts = checkpoint_facts(path)
    assert facts.lowbit_bytes == checkpoint_facts(checkpoints("int4-g64")).expert_bytes
    out, llm = generate(path, memory_budget=budget_for(path, 5, lowbit=True), miss_fallback="lowbit")
    tiers = llm.engine.tiers
    assert tiers.plan.lowbit_bytes == facts.lowbit_bytes and tiers.cache.slot_bytes == facts.slot_bytes
    st = llm.engine.tier_stats()
    assert st["fallback_lowbit"] > 0 and all(len(o) == GREEDY.max_tokens for o in out)
    formats = expert_formats(path)
    low = llm.engine.model.moe_blocks()[0].expert_provider.lowbit
    for (layer, e), f in formats.items():
        gate = low[layer][e].gate_proj
        assert isinstance(gate, QuantLinear) and gate.fmt.bits == 4 and not gate.qweight.is_meta
        assert gate.fmt.group_size == (f.group_size or 64)
    tiers.close()


def test_renormalize_fallback_on_quantized_store(checkpoints):
    path = checkpoints("int4-g64")
    out, llm = generate(path, memory_budget=budget_for(path, 5), miss_fallback="renormalize")
    st = llm.engine.tier_stats()
    assert st["fallback_renormalized"] > 0 and st["disk_bytes_read"] > 0
    assert all(len(o) == GREEDY.max_tokens for o in out)
    llm.engine.tiers.close()
