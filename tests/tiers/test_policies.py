"""Eviction policies on small sequences with hit counts computed by hand (see policies.py definitions)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.errors import StrataError
from strata.tiers.policies import ONLINE_POLICIES
from strata.tiers.pools import ExpertPools
from strata.tiers.simulate import simulate
from strata.tiers.trace import RoutingRecord, RoutingTrace


def hits(policy: str, seq: str, capacity: int = 2, **kw) -> int:
    """Single-layer accesses, one letter per expert."""
    keys = [(0, ord(c) - ord("A")) for c in seq]
    pools = ExpertPools(1, capacity, policy, future=keys if policy == "belady" else None, **kw)
    for k in keys:
        pools.access(k)
    return pools.stats.hits


# AAABCBCBC: LRU keeps the B/C pair; LFU keeps A forever (3 accesses) and thrashes B/C;
# LFRU (half-life 2) lets A decay and evicts it at the second B miss.
@pytest.mark.parametrize("policy,expected", [("lru", 6), ("lfu", 2), ("lfru", 5), ("belady", 6)])
def test_recency_vs_frequency(policy, expected):
    assert hits(policy, "AAABCBCBC") == expected


# AABCADAB: LRU evicts A at C; LFU and Belady keep A.
@pytest.mark.parametrize("policy,expected", [("lru", 2), ("lfu", 3), ("lfru", 3), ("belady", 3)])
def test_frequent_expert_kept(policy, expected):
    assert hits(policy, "AABCADAB") == expected


def test_score_policy_keeps_high_router_weight():
    # alpha 0.5; A routed with 0.9, B and C with 0.1: at C's miss A scores 0.1125 > B's 0.025, so B goes.
    pools = ExpertPools(1, 2, "score", alpha=0.5)
    for e, w in [(0, 0.9), (1, 0.1), (2, 0.1), (0, 0.9)]:
        pools.route(0, [e], [w])
        pools.access((0, e))
    assert pools.stats.hits == 1
    lru = ExpertPools(1, 2, "lru")
    for e in [0, 1, 2, 0]:
        lru.access((0, e))
    assert lru.stats.hits == 0


def test_nextuse_prefers_experts_needed_sooner():
    # two layers, global pool of 2; alpha 0.5. At token 2 layer 0, (0,a) has p=0.25 and its layer is 2
    # steps away: 2 + (4-1)*2 = 8; (1,x) has p=0.5, 1 step away: 1 + 1*2 = 3. So (0,a) goes.
    pools = ExpertPools(2, 2, "nextuse", alpha=0.5)
    pol = pools.pools[0].policy
    for layer, e in [(0, 0), (1, 0), (0, 1)]:
        pools.route(layer, [e], [1.0])
        if (layer, e) == (0, 1):
            assert pol.priority((0, 0))[0] == pytest.approx(-8.0)
            assert pol.priority((1, 0))[0] == pytest.approx(-3.0)
        _, _, evicted = pools.access((layer, e))
    assert evicted == (0, 0)


def test_per_layer_pools_split_slots():
    pools = ExpertPools(3, 7, "lru", layout="per-layer")
    assert [p.capacity for p in pools.pools] == [3, 2, 2]
    slots = {pools.access((layer, 0))[1] for layer in range(3)}
    assert slots == {0, 3, 5}  # each layer draws from its own range


def test_pinning_and_prefetch_rules():
    pools = ExpertPools(1, 3, "lru")
    assert pools.pin([(0, 7)]) == [((0, 7), 0)]
    for e in (1, 2, 3, 4):
        pools.access((0, e))
    assert (0, 7) in pools.resident_keys()  # never evicted
    pools.begin_prefetch_round()
    assert pools.prefetch((0, 5)) is not None
    assert pools.prefetch((0, 6)) is not None
    assert pools.prefetch((0, 8)) is None  # only the pin and unused prefetches are left to evict
    pools.access((0, 5))
    assert pools.stats.prefetch_hits == 1 and pools.stats.prefetch_coverage == pytest.approx(1 / 5)
    with pytest.raises(StrataError, match="cannot pin"):
        pools.pin([(0, 1), (0, 2)])


def test_wasted_prefetch_is_counted():
    pools = ExpertPools(1, 2, "lru", nbytes=lambda k: 100)
    pools.begin_prefetch_round()
    pools.prefetch((0, 1))
    pools.begin_prefetch_round()
    for e in (2, 3, 4):
        pools.access((0, e))
    assert pools.stats.prefetch_wasted == 1 and pools.stats.prefetch_waste_bytes == 100
    assert pools.stats.disk_bytes_read == 400


def _trace(tokens: list[list[int]], num_layers: int) -> RoutingTrace:
    recs = [RoutingRecord("r", t // num_layers, t % num_layers, ex, [1.0 / len(ex)] * len(ex))
            for t, ex in enumerate(tokens)]
    return RoutingTrace.from_records(recs, num_layers=num_layers, num_experts=6)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=2, unique=True),
                                    min_size=1, max_size=60), st.sampled_from([0.2, 0.34, 0.5, 0.8]))
def test_belady_is_never_beaten(num_layers, tokens, frac):
    trace = _trace(tokens, num_layers)
    for layout in ("global", "per-layer"):
        best = simulate(trace, "belady", frac, layout=layout).hits
        for policy in ONLINE_POLICIES:
            assert simulate(trace, policy, frac, layout=layout).hits <= best
