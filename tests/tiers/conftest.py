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
