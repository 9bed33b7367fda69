"""EngineMetrics.publish: the tier counters advance by the engine's deltas (bytes and seconds of expert reads)."""

from prometheus_client.parser import text_string_to_metric_families

from strata.server.metrics import EngineMetrics


def _engine(disk_bytes: int, disk_s: float) -> dict:
    """What LLMEngine.get_stats() returns with tiered experts."""
    tiers = {"tiered": True, "expert_hit_rate": 0.5, "disk_bytes_read": disk_bytes, "disk_read_s": disk_s}
    return {"kv_cache_usage": 0.0, "num_blocks": 4, "num_free_blocks": 4, "num_prefix_queries": 0,
            "num_prefix_hits": 0, "num_preemptions": 0, "spec_decode": None, "tiers": tiers}


def _samples(m: EngineMetrics) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}


def test_expert_read_bytes_and_seconds_give_the_disk_rate():
    m = EngineMetrics("tiny")
    m.publish(_engine(2_000_000_000, 1.0), 0, 0)
    m.publish(_engine(5_000_000_000, 2.5), 0, 0)  # totals since start: counters take the deltas
    got = _samples(m)
    assert got["strata:expert_disk_read_bytes_total"] == 5e9
    assert got["strata:expert_disk_read_seconds_total"] == 2.5
    assert got["strata:expert_disk_read_bytes_total"] / got["strata:expert_disk_read_seconds_total"] == 2e9
    assert got["strata:expert_cache_hit_rate"] == 0.5
