"""Speculative decoding with experts served from disk (--memory-budget) and with quantized weights: greedy
output unchanged, and verifying k drafted tokens reads each needed expert once for all of them."""

from __future__ import annotations

import os

import pytest
import torch

from strata import LLM
from strata.cli import main
from strata.engine.llm_engine import BUNDLED_MODEL
from strata.engine.sampling_params import SamplingParams
from strata.layers.linear import bf16_lib
from strata.layers.moe_native import take_counts
from strata.tiers import runtime
from strata.tiers.store_convert import checkpoint_facts

pytest.importorskip("transformers")
from tests.tiers.test_offload import budget_for

DRAFT = os.path.join(os.path.dirname(BUNDLED_MODEL), "shakespeare-draft")
pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(DRAFT, "config.json")), reason="bundled models not present"
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
PROMPTS = ["ROMEO:\nBut soft, what light", "JULIET:\nO Romeo, Romeo"]
SPEC = {"model": DRAFT, "num_speculative_tokens": 4}


def _ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_offloaded_experts(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "current_rss", lambda: 0)  # the budget below is an exact slot count
    ref = _ids(LLM(None, progress=False, dtype="float32").generate(PROMPTS, GREEDY))
    slots = checkpoint_facts(BUNDLED_MODEL).num_experts // 4  # a quarter of the experts' bytes
    llm = LLM(
        None,
        progress=False,
        dtype="float32",
        memory_budget=budget_for(BUNDLED_MODEL, slots),
        speculative_config=SPEC,
    )
    assert llm.engine.tiers.cache.num_slots == slots
    provider = llm.engine.model.moe_blocks()[0].expert_provider
    calls: list[tuple[int, list[int]]] = []
    acquire = provider.acquire
    monkeypatch.setattr(
        provider, "acquire", lambda layer, ids: calls.append((layer, list(ids))) or acquire(layer, ids)
    )
    runner, forwards = llm.engine.runner, []
    execute = runner.execute

    def counted(batch, num_scored=None):
        calls.clear()
        out = execute(batch, num_scored)
        forwards.append((bool(num_scored) and max(num_scored) > 1, list(calls)))
        return out

    monkeypatch.setattr(runner, "execute", counted)
    assert _ids(llm.generate(PROMPTS, GREEDY)) == ref
    num_layers = len(llm.engine.model.moe_blocks())
    verifies = [c for drafted, c in forwards if drafted]
    assert verifies and llm.engine.spec.num_accepted_tokens > 0
    for c in verifies:  # one request per layer for the union of the rows' experts, each expert once
        assert sorted(layer for layer, _ in c) == list(range(num_layers))
        assert all(len(ids) == len(set(ids)) for _, ids in c)
    llm.engine.tiers.close()


@pytest.mark.skipif(bf16_lib() is None, reason="native kernels unavailable on this machine")
def test_offloaded_bf16_verification_runs_the_native_grouped_call(tmp_path, monkeypatch):
    """bf16 experts from disk: a verification's MoE layers hold the union of its rows' experts at once and run
    the native grouped-expert kernel (each expert once for all rows), as plain offloaded decoding does for its
    one row; greedy output equals plain offloaded decoding's, and no KV block is left behind."""
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "current_rss", lambda: 0)
    slots = checkpoint_facts(BUNDLED_MODEL).num_experts // 4
    budget = budget_for(BUNDLED_MODEL, slots, torch.bfloat16)
    plain = LLM(None, progress=False, dtype="bfloat16", memory_budget=budget)
    take_counts()
    ref = _ids(plain.generate(PROMPTS, GREEDY))
    assert take_counts()["calls"] > 0  # plain offloaded decoding takes the native call too
    plain.engine.tiers.close()
    top_k = plain.engine.model_config.num_experts_per_tok
    for spec in (SPEC, {"method": "ngram", "num_speculative_tokens": 3}):
        llm = LLM(None, progress=False, dtype="bfloat16", memory_budget=budget, speculative_config=spec)
        runner, native_rows = llm.engine.runner, []
        execute = runner.execute

        def counted(batch, num_scored=None, execute=execute, native_rows=native_rows):
            take_counts()
            out = execute(batch, num_scored)
            if num_scored and max(num_scored) > 1:
                c = take_counts()
                native_rows.append(c["assignments"] / max(c["calls"], 1) / top_k)  # rows per native call
            return out

        monkeypatch.setattr(runner, "execute", counted)
        assert _ids(llm.generate(PROMPTS, GREEDY)) == ref
        assert llm.engine.spec.num_accepted_tokens > 0
        assert native_rows and max(native_rows) > 1  # multi-row native calls ran the verifications
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        llm.engine.tiers.close()


def test_quantized_target(tmp_path):
    dst = tmp_path / "int8"
    assert main(["quantize", "--format", "int8", "--no-progress", BUNDLED_MODEL, str(dst)]) == 0
    ref = _ids(LLM(str(dst), progress=False, dtype="float32").generate(PROMPTS, GREEDY))
    for spec in (SPEC, {"method": "ngram", "num_speculative_tokens": 3}):
        llm = LLM(str(dst), progress=False, dtype="float32", speculative_config=spec)
        assert _ids(llm.generate(PROMPTS, GREEDY)) == ref
        assert llm.engine.spec.num_drafts > 0
