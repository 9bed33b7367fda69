"""Cache simulation and `strata sim-cache` output (table, JSON keys, PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from strata.cli import main
from strata.tiers.simulate import simulate, sweep
from strata.tiers.trace import RoutingRecord, RoutingTrace, write_trace

MIXTRAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mixtral-8x7b-routing"


def cyclic_trace(num_tokens=40, num_layers=4, num_experts=4) -> RoutingTrace:
    """Layer l of token t uses experts (t + l) % E and (l % E): one sticky and one rotating expert."""
    recs = [RoutingRecord("r", t, layer, [(t + layer) % num_experts, layer % num_experts][: 2], [0.7, 0.3])
            for t in range(num_tokens) for layer in range(num_layers)]
    for r in recs:
        if r.experts[0] == r.experts[1]:
            r.experts, r.weights = r.experts[:1], [1.0]
    return RoutingTrace.from_records(recs)


def test_full_budget_only_compulsory_misses():
    t = cyclic_trace()
    r = simulate(t, "lru", 1.0, expert_bytes=10)
    distinct = {(s.layer, e) for s in t.steps for e in s.distinct_experts()}
    assert r.accesses - r.hits == len(distinct) and r.bytes_read == 10 * len(distinct)


def test_affinity_prefetch_learns_a_deterministic_chain():
    # token t: layer 0 picks e, layer 1 picks e+1, layer 2 picks e+2: affinity sees the chain exactly
    recs = [RoutingRecord("r", t, layer, [(t % 3 + layer) % 6], [1.0]) for t in range(60) for layer in range(3)]
    trace = RoutingTrace.from_records(recs, num_experts=6)
    none = simulate(trace, "lru", 3 / 18, "none")
    aff = simulate(trace, "lru", 3 / 18, "affinity", prefetch_k=1)
    assert aff.hit_rate > none.hit_rate + 0.5
    assert aff.prefetch_coverage > 0.6


def test_sweep_json_shape():
    t = cyclic_trace()
    rep = sweep(t, [0.25, 0.5], ["lru", "score"], ["none", "affinity"])
    assert len(rep["results"]) == 2 * 2 * 2
    for r in rep["results"]:
        assert {"policy", "prefetch", "budget_fraction", "hit_rate", "bytes_read"} <= set(r)
    assert [b["budget_fraction"] for b in rep["belady"]] == [0.25, 0.5]
    for r in rep["results"]:
        if r["prefetch"] == "none":
            assert r["hit_rate"] <= next(b["hit_rate"] for b in rep["belady"]
                                         if b["budget_fraction"] == r["budget_fraction"])


def test_cli_json_table_and_plot(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    write_trace(trace, cyclic_trace(20).records)
    png = tmp_path / "hit.png"
    assert main(["sim-cache", "--trace", str(trace), "--json", "--budgets", "0.25,0.5",
                 "--policies", "lru,lfu", "--prefetchers", "none,temporal", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["results"]) == 8 and len(out["belady"]) == 2
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["sim-cache", "--trace", str(trace), "--budgets", "0.5", "--policies", "nextuse",
                 "--prefetchers", "hybrid"]) == 0
    table = capsys.readouterr().out
    assert "belady" in table and "nextuse" in table and "hybrid" in table
    assert main(["sim-cache", "--trace", str(trace), "--policies", "fifo"]) == 2
    assert "unknown policy 'fifo'" in capsys.readouterr().err


def test_mixtral_trace_prefetch_reaches_belady_range():
    """The issue's aim on a real trace: the best online policy with prefetch gets >= 90% of Belady's hit
    rate at 25% and 50% budgets (it reads more bytes than Belady to do so: prefetches can be wrong)."""
    path = MIXTRAL / "gsm8k_2_routing.jsonl"
    if not path.exists():
        pytest.skip(f"{MIXTRAL} not available")
    from strata.tiers.trace import read_trace

    t = read_trace(path)
    for budget in (0.25, 0.5):
        opt = simulate(t, "belady", budget)
        best = simulate(t, "nextuse", budget, "hybrid")
        assert simulate(t, "nextuse", budget).hit_rate < opt.hit_rate
        assert best.hit_rate >= 0.9 * opt.hit_rate
        assert best.bytes_read > opt.bytes_read
