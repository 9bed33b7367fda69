"""Routing traces: Strata JSONL round trip, the Mixtral collector formats, replay lookup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from strata.tiers.trace import RoutingRecorder, RoutingReplay, TraceError, read_trace, read_traces

MIXTRAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mixtral-8x7b-routing"


def test_round_trip_and_steps(tmp_path):
    path = tmp_path / "t.jsonl"
    with RoutingRecorder(path) as rec:
        for tok in range(3):  # a 3-token prefill, layer-major, then one decode token
            rec.record("a", tok, 0, [tok, 3], [0.75, 0.25])
        for tok in range(3):
            rec.record("a", tok, 1, [1, 2], [0.5, 0.5])
        rec.record("a", 3, 0, [0, 1], [0.6, 0.4])
        rec.record("a", 3, 1, [2, 0], [0.9, 0.1])
        assert not path.exists()  # written under a temporary name until closed
    t = read_trace(path)
    assert (t.num_layers, t.num_experts, t.top_k, t.num_tokens) == (2, 4, 2, 4)
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {"request": "a", "token": 0, "layer": 0, "experts": [0, 3], "weights": [0.75, 0.25]}
    assert [(s.layer, s.tokens) for s in t.steps] == [(0, [0, 1, 2]), (1, [0, 1, 2]), (0, [3]), (1, [3])]
    assert t.steps[0].distinct_experts() == [0, 3, 1, 2]


def test_mixtral_decode_format_reordered(tmp_path):
    rows = [{"dataset": "d", "problem_id": 0, "layer": layer, "experts": [layer, tok], "gating_probs": [0.6, 0.4],
             "token_idx": tok} for layer in range(2) for tok in range(3)]  # layer-major, as collected
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = read_trace(p)
    assert [(r.token, r.layer) for r in t.records] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert t.records[0].request == "d/0" and t.records[0].weights == [0.6, 0.4]


def test_mixtral_raw_format_positions(tmp_path):
    rows = [{"dataset": "d", "problem_id": 0, "layer": layer, "token_pos": pos, "experts": [0, 1],
             "gating_probs": [0.5, 0.5]} for layer in range(2) for pos in range(4)]  # prefill of 4 tokens
    rows += [{"dataset": "d", "problem_id": 0, "layer": layer, "token_pos": 0, "experts": [1, 0],
              "gating_probs": [0.5, 0.5]} for _ in range(2) for layer in (0, 1)]  # two decode steps
    p = tmp_path / "raw.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = read_trace(p)
    assert [r.token for r in t.records[8:]] == [4, 4, 5, 5]
    assert [len(s.tokens) for s in t.steps] == [4, 4, 1, 1, 1, 1]


def test_bad_traces_name_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"request": "a", "token": 0, "layer": 0, "experts": [1], "weights": [1.0]}\n{oops\n')
    with pytest.raises(TraceError, match=r"bad.jsonl:2: invalid JSON"):
        read_trace(p)
    p.write_text('{"request": "a", "token": 0, "layer": 0, "experts": [1, 2], "weights": [1.0]}\n')
    with pytest.raises(TraceError, match=r"bad.jsonl:1: 'experts' has 2 entries but 'weights' has 1"):
        read_trace(p)
    with pytest.raises(TraceError, match="file not found"):
        read_trace(tmp_path / "none.jsonl")


def test_replay_lookup_wraps_and_fills_gaps(tmp_path):
    p = tmp_path / "t.jsonl"
    with RoutingRecorder(p) as rec:
        rec.record("x", 0, 0, [1, 2], [0.5, 0.5])
        rec.record("x", 0, 1, [3, 0], [0.5, 0.5])
        rec.record("x", 1, 0, [2, 3], [0.5, 0.5])  # token 1 lacks layer 1
        rec.record("y", 0, 0, [0, 1], [0.5, 0.5])
    r = RoutingReplay(read_trace(p))
    assert r.lookup(0, 1, 0)[0] == [2, 3]
    assert r.lookup(0, 1, 1)[0] == [3, 0]  # falls back to token 0's layer 1
    assert r.lookup(0, 2, 0)[0] == [1, 2]  # wraps around
    assert r.lookup(1, 0, 0)[0] == [0, 1] and r.lookup(2, 0, 0)[0] == [1, 2]


def test_real_mixtral_traces():
    files = [MIXTRAL / "humaneval_2_routing.jsonl", MIXTRAL / "humaneval0_prefill_decode_raw.jsonl"]
    if not all(f.exists() for f in files):
        pytest.skip(f"{MIXTRAL} not available")
    t = read_traces(files)
    assert (t.num_layers, t.num_experts, t.top_k) == (32, 8, 2)
    raw = read_trace(files[1])
    assert max(len(s.tokens) for s in raw.steps) == 135  # the prefill
    assert raw.num_tokens == 135 + 83


def test_replay_maps_onto_a_finer_model(tmp_path):
    p = tmp_path / "t.jsonl"
    with RoutingRecorder(p) as rec:
        rec.record("x", 0, 0, [3, 1], [0.75, 0.25])
        rec.record("x", 0, 1, [0, 2], [0.5, 0.5])
    r = RoutingReplay(read_trace(p), num_experts=16, top_k=8)  # trace: 4 experts, top-2, 2 layers
    ids, ws = r.lookup(0, 0, 2)  # four blocks of 4 experts from trace layers 8..11 = 0, 1, 0, 1 (mod 2)
    assert ids == [3, 1, 4, 6, 11, 9, 12, 14]
    assert ws == [0.1875, 0.0625, 0.125, 0.125] * 2
    r = RoutingReplay(read_trace(p), num_experts=16, top_k=6)  # 6 is not 4 blocks x q: groups of experts
    ids, ws = r.lookup(0, 0, 2)  # model layer 2 replays trace layer 0: expert 3 -> 12..14, 1 -> 4..6
    assert ids == [12, 13, 14, 4, 5, 6]
    assert ws == pytest.approx([0.25] * 3 + [0.25 / 3] * 3)
    r = RoutingReplay(read_trace(p), num_experts=8, top_k=2)  # two blocks of 4, top-1 of trace layers 0 and 1
    assert r.lookup(0, 0, 0) == ([3, 4], [0.6, 0.4])
    assert r.lookup(0, 0, 1) == ([3, 4], [0.6, 0.4])  # layer 1 combines trace layers 2, 3 = 0, 1 (mod 2)
