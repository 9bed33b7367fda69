"""The engine loads what the memory plan counts as runtime before the plan measures it."""

from __future__ import annotations

import strata.engine.llm_engine as llm_engine
from strata.config import EngineConfig
from strata.engine.llm_engine import LLMEngine


def test_tokenizer_loads_before_the_budget_plan(monkeypatch):
    """The plan takes the RSS at planning time as runtime; a tokenizer loaded after it (~40 MB for a 50k BPE
    vocabulary) would sit outside --memory-budget (measured: peak RSS 3% over the budget)."""
    order = []
    tokenizer, load = llm_engine.Tokenizer, llm_engine.load_model_tiered

    def tok(*a, **k):
        order.append("tokenizer")
        return tokenizer(*a, **k)

    def tiered(*a, **k):
        order.append("model")
        return load(*a, **k)

    monkeypatch.setattr(llm_engine, "Tokenizer", tok)
    monkeypatch.setattr(llm_engine, "load_model_tiered", tiered)
    engine = LLMEngine(EngineConfig(model=llm_engine.BUNDLED_MODEL, memory_budget=64 << 30), progress=False)
    assert order == ["tokenizer", "model"] and engine.tokenizer is not None
