"""Routing traces: Strata's JSONL format (reader, writer, replay) and a reader for the Mixtral traces.

Strata's format is one JSON object per (request, token, layer) in execution order:
    {"request": "r0", "token": 12, "layer": 3, "experts": [5, 1], "weights": [0.7, 0.3]}
`experts` are highest weight first. A *step* is a maximal run of consecutive records with the same
(request, layer): one forward call's routing at one layer (many tokens in prefill, one in decode).
The cache simulator and the expert cache treat a step's distinct experts as one batch of accesses.

The published Mixtral-8x7B routing traces (their files are given by path) come in two shapes, both read here:
`*_2_routing.jsonl` (decode only, layer-major per problem, `token_idx`) is reordered into execution
order; `*_raw.jsonl` (execution order, `token_pos` restarting at 0 per forward call) keeps its order
and gets absolute token positions (the first call is the prefill).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from strata.errors import StrataError


class TraceError(StrataError):
    """A routing trace file is missing or malformed."""


@dataclass
class RoutingRecord:
    request: str
    token: int
    layer: int
    experts: list[int]
    weights: list[float]

    def to_json(self) -> str:
        return json.dumps({"request": self.request, "token": self.token, "layer": self.layer,
                           "experts": list(self.experts), "weights": [round(float(w), 6) for w in self.weights]})


@dataclass
class Step:
    """One forward call's routing at one layer: per-token expert lists, highest weight first."""

    request: str
    layer: int
    tokens: list[int]
    experts: list[list[int]]
    weights: list[list[float]]

    def distinct_experts(self) -> list[int]:
        """Experts in first-use order, each once (a batch loads an expert once for all its tokens)."""
        seen: dict[int, None] = {}
        for ex in self.experts:
            for e in ex:
                seen.setdefault(e, None)
        return list(seen)


@dataclass
class RoutingTrace:
    records: list[RoutingRecord]
    num_layers: int
    num_experts: int
    top_k: int
    source: str = ""
    steps: list[Step] = field(default_factory=list)

    @classmethod
    def from_records(cls, records: list[RoutingRecord], source: str = "",
                     num_layers: int | None = None, num_experts: int | None = None) -> RoutingTrace:
        if not records:
            raise TraceError(f"{source or 'trace'}: no routing records")
        L = num_layers or 1 + max(r.layer for r in records)
        E = num_experts or 1 + max(max(r.experts) for r in records if r.experts)
        k = max(len(r.experts) for r in records)
        return cls(records, L, E, k, source, _group_steps(records))

    @property
    def num_tokens(self) -> int:
        return len({(r.request, r.token) for r in self.records})


def _group_steps(records: list[RoutingRecord]) -> list[Step]:
    steps: list[Step] = []
    for r in records:
        last = steps[-1] if steps else None
        if last is not None and last.request == r.request and last.layer == r.layer:
            last.tokens.append(r.token)
            last.experts.append(list(r.experts))
            last.weights.append(list(r.weights))
        else:
            steps.append(Step(r.request, r.layer, [r.token], [list(r.experts)], [list(r.weights)]))
    return steps


class RoutingRecorder:
    """Writes Strata JSONL to `path` via a temporary file renamed on close (no half-written trace)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
        self._f = open(self._tmp, "w")  # noqa: SIM115 - open for the recorder's lifetime, closed by close()
        self.num_records = 0

    def record(self, request: str, token: int, layer: int, experts, weights) -> None:
        rec = RoutingRecord(str(request), int(token), int(layer), [int(e) for e in experts],
                            [float(w) for w in weights])
        self._f.write(rec.to_json() + "\n")
        self.num_records += 1

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        os.replace(self._tmp, self.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_trace(path: str | os.PathLike, records: list[RoutingRecord]) -> None:
    with RoutingRecorder(path) as rec:
        for r in records:
            rec.record(r.request, r.token, r.layer, r.experts, r.weights)


def _load_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise TraceError(f"{path}: file not found (expected a routing trace in JSONL)")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(d, dict):
                raise TraceError(f"{path}:{n}: expected a JSON object per line, got {type(d).__name__}")
            out.append(d)
    if not out:
        raise TraceError(f"{path}: empty trace")
    return out


def _need(d: dict, key: str, path: Path, n: int):
    if key not in d:
        raise TraceError(f"{path}:{n}: missing field '{key}' (have {sorted(d)})")
    return d[key]


def _strata_records(rows: list[dict], path: Path) -> list[RoutingRecord]:
    recs = []
    for n, d in enumerate(rows, 1):
        ex, w = _need(d, "experts", path, n), _need(d, "weights", path, n)
        if len(ex) != len(w):
            raise TraceError(f"{path}:{n}: 'experts' has {len(ex)} entries but 'weights' has {len(w)}")
        recs.append(RoutingRecord(str(_need(d, "request", path, n)), int(_need(d, "token", path, n)),
                                  int(_need(d, "layer", path, n)), [int(e) for e in ex], [float(x) for x in w]))
    return recs


def _mixtral_records(rows: list[dict], path: Path) -> list[RoutingRecord]:
    def req(d):
        return f"{d.get('dataset', 'trace')}/{d.get('problem_id', 0)}"

    def rec(d, n, token):
        return RoutingRecord(req(d), token, int(_need(d, "layer", path, n)),
                             [int(e) for e in _need(d, "experts", path, n)],
                             [float(x) for x in _need(d, "gating_probs", path, n)])

    if "token_idx" in rows[0]:
        # layer-major per problem -> execution order: problem (first-seen order), token, layer
        order = {r: i for i, r in enumerate(dict.fromkeys(req(d) for d in rows))}
        recs = [rec(d, n, int(d["token_idx"])) for n, d in enumerate(rows, 1)]
        recs.sort(key=lambda r: (order[r.request], r.token, r.layer))
        return recs
    # execution order with token_pos per forward call: a new call starts when the layer goes down
    recs, call, prev_layer, prev_req, n_prompt = [], 0, -1, None, 0
    for n, d in enumerate(rows, 1):
        layer, pos, r = int(_need(d, "layer", path, n)), int(_need(d, "token_pos", path, n)), req(d)
        if r != prev_req:
            call, prev_layer, n_prompt = 0, -1, 0
        elif layer < prev_layer:
            call += 1
        prev_layer, prev_req = layer, r
        if call == 0:
            n_prompt = max(n_prompt, pos + 1)
        recs.append(rec(d, n, pos if call == 0 else n_prompt + call - 1 + pos))
    return recs


def read_trace(path: str | os.PathLike, num_layers: int | None = None,
               num_experts: int | None = None) -> RoutingTrace:
    """Reads a Strata or Mixtral-collector JSONL trace (format detected from the first record)."""
    path = Path(path)
    rows = _load_jsonl(path)
    if "gating_probs" in rows[0]:
        recs = _mixtral_records(rows, path)
    elif "request" in rows[0] and "weights" in rows[0]:
        recs = _strata_records(rows, path)
    else:
        raise TraceError(f"{path}:1: unknown trace format: expected keys request/token/layer/experts/weights "
                         f"(Strata) or layer/experts/gating_probs (Mixtral collector), got {sorted(rows[0])}")
    return RoutingTrace.from_records(recs, str(path), num_layers, num_experts)


def read_traces(paths: list[str | os.PathLike]) -> RoutingTrace:
    """Several trace files served one after another (requests in sequence, cache kept warm)."""
    traces = [read_trace(p) for p in paths]
    recs = [r for t in traces for r in t.records]
    return RoutingTrace.from_records(recs, ",".join(t.source for t in traces),
                                     max(t.num_layers for t in traces), max(t.num_experts for t in traces))


class RoutingReplay:
    """Forces routing from a trace: `lookup(request_index, token_index, layer)` -> (experts, weights).

    Requests are matched by order of first appearance and tokens by their order inside the request, so a
    benchmark on random weights sees the trace's expert locality. Past a request's end it wraps around;
    a (token, layer) the trace lacks falls back to the nearest earlier token that has that layer.
    For a model with b = E_model / E_trace times more experts whose top-k is b times a number q <= k_trace
    of trace picks (OLMoE's 64 top-8 from Mixtral's 8 top-2: b = 8, q = 1), model layer l combines trace
    layers b*l .. b*l+b-1 (mod L_trace): block j of E_trace experts replays the top-q choices of trace
    layer b*l+j, so every model expert is used with the locality of one trace expert. Otherwise layer l
    replays trace layer l mod L_trace and trace expert e becomes experts e*g .. e*g+p-1 (g = E_model //
    E_trace, p = ceil(k_model / k_trace)), sharing e's weight.
    """

    def __init__(self, trace: RoutingTrace, num_experts: int | None = None, top_k: int | None = None):
        self.trace = trace
        self.num_experts = num_experts or trace.num_experts
        self.top_k = top_k or trace.top_k
        self._by_req: list[list[dict[int, tuple[list[int], list[float]]]]] = []
        index: dict[str, dict[int, dict[int, tuple[list[int], list[float]]]]] = {}
        for r in trace.records:
            index.setdefault(r.request, {}).setdefault(r.token, {})[r.layer] = (r.experts, r.weights)
        for toks in index.values():
            self._by_req.append([toks[t] for t in sorted(toks)])

    def lookup(self, request_index: int, token_index: int, layer: int) -> tuple[list[int], list[float]]:
        b, q = self._blocks()
        if b > 1:
            ids, ws = [], []
            for j in range(b):
                ex, w = self._raw(request_index, token_index, b * layer + j)
                ids += [j * self.trace.num_experts + e for e in ex[:q]]
                ws += w[:q]
            total = sum(ws) or 1.0
            return ids, [w / total for w in ws]
        return self._map(*self._raw(request_index, token_index, layer))

    def _blocks(self) -> tuple[int, int]:
        b = self.num_experts // self.trace.num_experts
        if b > 1 and self.num_experts % self.trace.num_experts == 0 and self.top_k % b == 0 \
                and self.top_k // b <= self.trace.top_k:
            return b, self.top_k // b
        return 1, 0

    def _raw(self, request_index: int, token_index: int, layer: int) -> tuple[list[int], list[float]]:
        tokens = self._by_req[request_index % len(self._by_req)]
        t = token_index % len(tokens)
        trace_layer = layer % self.trace.num_layers
        for back in range(len(tokens)):
            hit = tokens[(t - back) % len(tokens)].get(trace_layer)
            if hit is not None:
                return hit
        raise TraceError(f"{self.trace.source}: no routing for layer {trace_layer} in request {request_index}")

    def _map(self, experts: list[int], weights: list[float]) -> tuple[list[int], list[float]]:
        E, k = self.num_experts, self.top_k
        if E == self.trace.num_experts and k == len(experts):
            return experts, weights
        group = max(E // self.trace.num_experts, 1)
        per = -(-k // max(len(experts), 1))
        out: dict[int, float] = {}
        for e, w in zip(experts, weights):
            for j in range(per):
                out[(e * group + j) % E] = out.get((e * group + j) % E, 0.0) + w / per
        ids = list(out)[:k]
        ids += [e for e in range(E) if e not in out][: k - len(ids)]  # too few distinct: pad, weight 0
        ws = [out.get(e, 0.0) for e in ids]
        total = sum(ws) or 1.0
        return ids, [w / total for w in ws]
