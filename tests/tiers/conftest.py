"""Fixtures shared by the tier tests: one torch thread, and a private expert-store cache with exact budgets."""

import pytest
import torch

from strata.tiers import runtime


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: two spinning OpenMP threads are hundreds of times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "current_rss", lambda: 0)  # budgets below are exact slot counts


def budget_for(path: str, num_slots: int, lowbit: bool = False) -> int:
    """A --memory-budget that leaves exactly `num_slots` expert slots at float32 compute (with `isolated`)."""
    from strata.config import EngineConfig
    from strata.models.registry import load_config
    from strata.tiers.store_convert import checkpoint_facts

    facts = checkpoint_facts(path)
    cfg = load_config(path)
    plan = runtime._plan(path, EngineConfig(memory_budget=1 << 40), cfg, torch.float32, facts, lowbit)
    return plan.fixed_bytes + num_slots * facts.slot_bytes
