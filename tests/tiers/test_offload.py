"""Offloaded generation is token-for-token identical to resident generation (greedy), at any budget and
with every prefetcher; budget refusal; routing record and replay; generate --stats-json keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from strata import LLM
from strata.cli import main
from strata.config import EngineConfig
from strata.engine.sampling_params import SamplingParams
from strata.models.registry import load_config
from strata.tiers import runtime
from strata.tiers.budget import BudgetError
from strata.tiers.store_convert import checkpoint_facts
from strata.tiers.trace import read_trace
from strata.weights.loader import resolve_dtype
from tests.models.conftest import build_hf

PROMPTS = [[1, 5, 9, 33, 70], [1, 200, 3]]
pytestmark = pytest.mark.usefixtures("one_thread", "isolated")
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(family: str, dtype=torch.float32):
        key = (family, dtype)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{family}-{str(dtype)[6:]}")
            build_hf(family, path, dtype=dtype)
            ref = LLM(str(path), progress=False, dtype="float32").generate(PROMPTS, GREEDY)
            cache[key] = (str(path), [o.outputs[0].token_ids for o in ref])
        return cache[key]

    return get


def budget_for(path: str, num_slots: int, dtype: torch.dtype | None = torch.float32,
               max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens) -> int:
    facts = checkpoint_facts(path)
    cfg = load_config(path)
    dtype = dtype or resolve_dtype(None, cfg)
    config = EngineConfig(memory_budget=1 << 40, max_num_batched_tokens=max_num_batched_tokens)
    fixed = runtime._plan(path, config, cfg, dtype, facts).fixed_bytes
    return fixed + num_slots * facts.slot_bytes


CASES = [("mixtral", 4, "none"), ("mixtral", 4, "hybrid"), ("mixtral", 7, "lookahead"), ("mixtral", 11, "affinity"),
         ("qwen3_moe", 4, "lookahead"), ("qwen3_moe", 5, "temporal"), ("olmoe", 4, "none"), ("olmoe", 9, "hybrid"),
         ("qwen2_moe", 4, "lookahead")]


@pytest.mark.parametrize("family,slots,prefetch", CASES)
def test_offloaded_equals_resident(models, family, slots, prefetch):
    path, ref = models(family)
    llm = LLM(path, progress=False, dtype="float32", memory_budget=budget_for(path, slots), prefetch=prefetch,
              expert_cache_policy="nextuse" if slots % 2 else "lru")
    out = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert out == ref
    st = llm.engine.tier_stats()
    assert st["tiered"] and st["expert_cache_slots"] == slots
    assert 0 <= st["expert_hit_rate"] < 1 and st["disk_bytes_read"] > 0
    assert all(b.experts[0].gate_proj.weight.is_meta if hasattr(b.experts[0], "gate_proj")
               else b.experts[0].w1.weight.is_meta for b in llm.engine.model.moe_blocks())
    llm.engine.tiers.close()


def test_half_precision_checkpoint_computed_in_float32(models):
    path, ref = models("mixtral", torch.bfloat16)
    llm = LLM(path, progress=False, dtype="float32", memory_budget=budget_for(path, 5))
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == ref
    llm.engine.tiers.close()


def test_budget_that_holds_everything_loads_resident(models):
    path, ref = models("olmoe")
    llm = LLM(path, progress=False, dtype="float32", memory_budget=budget_for(path, 1000))
    assert llm.engine.tiers is None
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == ref


def test_refusal_gives_the_minimum(models):
    path, _ = models("mixtral")
    with pytest.raises(BudgetError, match=r"is too small: .*the minimum that would work is --memory-budget"):
        # below the minimum even with the smallest step token budget the plan would lower to
        LLM(path, progress=False, dtype="float32",
            memory_budget=budget_for(path, 3, max_num_batched_tokens=runtime.MIN_STEP_TOKENS))


def test_record_then_replay_routing(models, tmp_path):
    path, ref = models("mixtral")
    rec = tmp_path / "routing.jsonl"
    llm = LLM(path, progress=False, dtype="float32", record_routing=str(rec))
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == ref
    llm.engine.tiers.close()
    trace = read_trace(rec)
    assert trace.num_layers == 3 and trace.top_k == 2 and len(trace.records) == 3 * (5 + 3 + 2 * 9)
    assert {r.request for r in trace.records} == {"req-0", "req-1"}
    # replay a fixed routing (every token: experts 3 and 1) under a budget, recording what ran
    forced = tmp_path / "forced.jsonl"
    forced.write_text("".join(json.dumps({"request": "x", "token": 0, "layer": layer, "experts": [3, 1],
                                          "weights": [0.5, 0.5]}) + "\n" for layer in range(3)))
    again = tmp_path / "again.jsonl"
    llm = LLM(path, progress=False, dtype="float32", replay_routing=str(forced), record_routing=str(again),
              memory_budget=budget_for(path, 6))
    llm.generate(PROMPTS, GREEDY)
    st = llm.engine.tier_stats()
    llm.engine.tiers.close()
    assert {tuple(r.experts) for r in read_trace(again).records} == {(3, 1)}
    assert st["expert_misses"] == 3 * 2  # the same 6 experts over and over in 6 slots: cold misses only


def test_generate_stats_json(models, tmp_path, capsys):
    path, _ = models("olmoe")
    out = tmp_path / "stats.json"
    rc = main(["generate", "the quick brown fox", "--model", path, "--memory-budget", str(budget_for(path, 6)), "--max-tokens", "4",
               "--temperature", "0", "--dtype", "float32", "--stats-json", str(out), "--prefetch", "affinity"])
    assert rc == 0
    stats = json.loads(out.read_text())
    for key in ("tokens_per_s", "expert_hit_rate", "prefetch_coverage", "prefetch_waste_bytes", "disk_bytes_read",
                "io_stall_s", "peak_rss_bytes"):
        assert key in stats
    assert stats["disk_bytes_read"] > 0 and stats["expert_cache_slots"] == 6


def test_bundled_moe_offloaded_equals_resident():
    from strata.engine.llm_engine import BUNDLED_MODEL

    if not (load_config(BUNDLED_MODEL).is_moe if (Path(BUNDLED_MODEL) / "config.json").exists()
            else False):
        pytest.skip("bundled MoE model not present")
    ref = [o.outputs[0].token_ids for o in LLM(None, progress=False).generate(PROMPTS, GREEDY)]
    facts = checkpoint_facts(BUNDLED_MODEL)
    for slots in (4, max(4, facts.num_experts // 3)):
        llm = LLM(None, progress=False, memory_budget=budget_for(BUNDLED_MODEL, slots, dtype=None))
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == ref
        llm.engine.tiers.close()
