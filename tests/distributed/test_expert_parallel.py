"""--enable-expert-parallel on gloo: each rank holds half the routed experts, greedy output equals one process
(linear placement, and affinity placement from a recorded routing trace); the placement rules on their own."""

import pytest
import torch

from strata.config import EngineConfig
from strata.distributed.expert_parallel import (
    affinity_placement,
    check_supported,
    expert_of,
    linear_placement,
    placement_report,
)
from strata.distributed.launcher import shutdown
from strata.distributed.tensor_parallel import shard_dim
from strata.errors import ConfigError, UnsupportedError
from strata.models.registry import load_config
from strata.tiers.trace import RoutingRecord, RoutingTrace
from tests.distributed.conftest import greedy, make_engine
from tests.models.conftest import build_hf


def _ep2_equals_one_process(path, family: str, **knobs):
    build_hf(family, path)
    one = make_engine(path, 1, **knobs.pop("one_process", {}))
    want = greedy(one)
    if one.tiers is not None:
        one.tiers.close()  # writes the routing trace
    engine = make_engine(path, 2, enable_expert_parallel=True, **knobs)
    try:
        got = greedy(engine)
        placement = engine.model.__dict__["expert_placement"]
        block = engine.model.moe_blocks()[0]
        mine = sorted(block.local_experts)
        assert mine == (placement[0] == 0).nonzero().flatten().tolist() and len(mine) == block.num_experts // 2
        for e, expert in enumerate(block.experts):  # whole experts here, the other rank's on the meta device
            assert all(p.is_meta != (e in mine) for p in expert.parameters())
        assert got == want and all(len(t) == 10 for t in got)
    finally:
        shutdown(engine.model)
    return placement


def test_ep2_linear_placement_equals_one_process(tmp_path):
    placement = _ep2_equals_one_process(tmp_path, "qwen3_moe")
    assert torch.equal(placement, linear_placement(placement.shape[0], 8, 2))


def test_ep2_affinity_placement_from_a_recorded_trace_equals_one_process(tmp_path):
    trace = tmp_path / "routing.jsonl"
    placement = _ep2_equals_one_process(tmp_path, "olmoe", expert_placement_trace=str(trace),
                                        one_process={"record_routing": str(trace)})
    assert (placement == 0).sum(dim=1).tolist() == [4] * placement.shape[0]  # equal experts per rank


def _trace(pairs_by_layer: list[list[tuple[int, int]]]) -> RoutingTrace:
    recs = [RoutingRecord("r", t, layer, list(pair), [0.6, 0.4])
            for t, per_layer in enumerate(zip(*pairs_by_layer, strict=True))
            for layer, pair in enumerate(per_layer)]
    return RoutingTrace.from_records(recs, "synthetic", 2, 4)


def test_affinity_places_co_activated_experts_together():
    # layer 0: experts 0 and 3 always together, 1 and 2 together; layer 1 follows the rank of layer 0's pair
    trace = _trace([[(0, 3), (1, 2)] * 5, [(2, 0), (1, 3)] * 5])
    placement = affinity_placement(trace, 2, 4, 2)
    assert placement[0, 0] == placement[0, 3] != placement[0, 1] == placement[0, 2]
    assert placement[1, 2] == placement[1, 0] == placement[0, 0]  # inter-layer: the same rank as before
    got, linear = placement_report(trace, placement, 2), placement_report(trace, linear_placement(2, 4, 2), 2)
    assert got.ranks_per_token == 1.0 and linear.ranks_per_token == 2.0
    assert got.imbalance == 1.0


def test_expert_tensors_stay_whole_and_checks():
    name = "model.layers.3.block_sparse_moe.experts.2.w2.weight"
    assert expert_of(name) == (3, 2) and expert_of("model.layers.3.mlp.shared_expert.down_proj.weight") is None
    assert shard_dim(name) == 1 and shard_dim(name, ep=True) is None
    assert shard_dim("model.layers.3.mlp.shared_expert.down_proj.weight", ep=True) == 1
    with pytest.raises(ConfigError, match="--enable-expert-parallel needs --tensor-parallel-size >= 2"):
        EngineConfig(enable_expert_parallel=True)
    with pytest.raises(ConfigError, match="--expert-placement-trace needs --enable-expert-parallel"):
        EngineConfig(tensor_parallel_size=2, expert_placement_trace="t.jsonl")


def test_dense_and_indivisible_experts_are_refused(tmp_path):
    build_hf("llama", tmp_path / "dense")
    with pytest.raises(UnsupportedError, match="--enable-expert-parallel needs a MoE model"):
        check_supported(load_config(tmp_path / "dense"), 2, "m")
    build_hf("mixtral", tmp_path / "moe")
    with pytest.raises(ConfigError, match="'num_experts' = 4 is not divisible by --tensor-parallel-size 3"):
        check_supported(load_config(tmp_path / "moe"), 3, "m")


def test_ep2_with_a_memory_budget_per_rank_equals_one_process(tmp_path, monkeypatch):
    from strata.tiers import runtime
    from strata.tiers.store_convert import checkpoint_facts

    build_hf("mixtral", tmp_path / "m")
    path = str(tmp_path / "m")
    want = greedy(make_engine(path, 1))
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path / "cache"))  # the expert store, shared by the ranks
    monkeypatch.setattr(runtime, "current_rss", lambda: 0)
    facts = checkpoint_facts(path)
    plan = runtime._plan(path, EngineConfig(max_num_batched_tokens=8, kv_cache_memory=2**20, memory_budget=2**40),
                         load_config(path), torch.float32, facts)
    budget = plan.fixed_bytes + 4 * facts.slot_bytes + 2**30
    # rank 0 counts 1 GiB as its runtime, so 4 expert slots are left of the budget; the worker measures its
    # real RSS (well under 1 GiB), so its slots hold its experts; each rank loads only the experts it owns
    monkeypatch.setattr(runtime, "current_rss", lambda: 2**30)
    engine = make_engine(path, 2, enable_expert_parallel=True, memory_budget=budget)
    try:
        got = greedy(engine)
        stats = engine.tier_stats()  # rank 0's tiers: 4 slots for its 2 experts x 3 layers, read from the store
        assert stats["tiered"] and stats["expert_cache_slots"] == 4 and stats["disk_bytes_read"] > 0
    finally:
        shutdown(engine.model)
    assert got == want


def test_a_memory_budget_needs_expert_parallel(tmp_path):
    build_hf("mixtral", tmp_path)
    with pytest.raises(UnsupportedError, match="--memory-budget with --tensor-parallel-size > 1 needs "
                                               "--enable-expert-parallel"):
        make_engine(tmp_path, 2, memory_budget=2**30)
