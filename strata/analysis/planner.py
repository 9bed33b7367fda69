"""`strata plan`: rank Strata configurations for a model under a memory budget on this machine.

Candidates: weight precision (bf16/int8/int4), expert cache size (whatever the budget leaves after the
non-expert weights and KV), cache policy (lru/lfu/score), prefetch on/off, threads. Each is priced by the
same cost model on the probed profile; the expert tier is the disk (flash) on a CPU-only machine.
Hit rates come from a routing trace when given, else uniform routing (then policies tie, and we say so).
Measured runs (~/.cache/strata/runs.jsonl) correct the predictions: the geometric mean of measured /
predicted for the same model scales every candidate, and an exact config match replaces its prediction.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from strata.analysis.efficiency import Efficiencies
from strata.analysis.hardware import System
from strata.analysis.operators import kv_cache_bytes, weight_bytes
from strata.analysis.placement import Scenario
from strata.analysis.precision import Precisions
from strata.analysis.predict import predict
from strata.analysis.shapes import ModelShape
from strata.analysis.trace import POLICIES, hit_rate, uniform_hit_rate

RUNS_PATH = Path.home() / ".cache" / "strata" / "runs.jsonl"
# plan's precision names -> Strata's stored formats (weight-only, dequantized in the GEMV; lm_head stays bf16)
PLAN_FORMATS = {"bf16": "bf16", "int8": "int8wo", "int4": "int4-g64"}
PREFETCH_OVERLAP = 0.5  # share of miss transfers a next-layer predictor hides (assumed, not yet measured)


@dataclass
class Candidate:
    precision: str
    cache_frac: float
    cache_experts: int
    policy: str
    prefetch: bool
    threads: int
    hit_rate: float
    predicted_tok_s: float
    corrected_tok_s: float
    fits: bool
    why: str = ""

    def config(self) -> dict:
        return {"precision": self.precision, "cache_experts": self.cache_experts, "policy": self.policy,
                "prefetch": self.prefetch, "threads": self.threads}


def load_runs(path: str | os.PathLike = RUNS_PATH) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    runs = []
    for line in p.read_text().splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(d, dict) and d.get("tokens_per_s"):
            runs.append(d)
    return runs


def _threads_system(sys: System, threads: int, profile: dict) -> System:
    by = {int(k): v for k, v in profile.get("bandwidth_by_threads_gbs", {}).items()}
    if not by:
        return sys
    top = max(by)
    bw = by[min(by, key=lambda k: abs(k - threads))] if threads in by else min(by[top], by.get(1, by[top]) * threads)
    peak = {k: v * min(threads, top) / top for k, v in sys.device.peak_tflops.items()}
    dev = replace(sys.device, bandwidth_gbs=bw, peak_tflops=peak)
    return replace(sys, device=dev)


def plan(shape: ModelShape, sys: System, budget: float, profile: dict, prompt: int = 128, gen: int = 128,
         trace=None, runs: list[dict] | None = None, model_name: str = "", effs: Efficiencies | None = None
         ) -> list[Candidate]:
    effs = effs or Efficiencies.load()
    threads_max = int(profile.get("threads", os.cpu_count() or 1))
    thread_opts = sorted({1, threads_max})
    out: list[Candidate] = []
    for prec, fmt in PLAN_FORMATS.items():
        p = Precisions(fmt, activations="bf16", kv="bf16", head="bf16")
        wb = weight_bytes(shape, p)
        kv = kv_cache_bytes(shape, p, 1, prompt + gen)
        room = budget - wb["non_expert"] - kv
        if shape.is_moe:
            frac = max(0.0, min(1.0, room / wb["experts"]))
            fits = room >= 0
        else:
            frac, fits = 1.0, wb["total"] + kv <= budget
        per_layer = max(sum(shape.moe_layer), 1)
        cache_experts = int(frac * shape.num_experts * per_layer)
        policies = POLICIES if shape.is_moe and frac < 1.0 else ("lru",)
        for policy in policies:
            if trace and shape.is_moe:  # an empty trace falls back to uniform routing
                h = hit_rate(trace, int(frac * shape.num_experts), policy)
            else:
                h = uniform_hit_rate(frac)
            for prefetch in ((False, True) if shape.is_moe and frac < 1.0 else (False,)):
                for th in thread_opts:
                    sc = Scenario(batch=1, prompt=prompt, gen=gen, prec=p, engine="strata",
                                  offload="experts" if shape.is_moe and frac < 1.0 else "none",
                                  expert_tier="flash", cache_frac=frac, hit_rate=h,
                                  prefetch=PREFETCH_OVERLAP if prefetch else 0.0, cold="transfer")
                    pr = predict(shape, _threads_system(sys, th, profile), sc, effs)
                    out.append(Candidate(prec, frac, cache_experts, policy, prefetch, th, h, pr.decode_tok_s,
                                         pr.decode_tok_s, fits))
    _correct(out, runs or [], model_name)
    out.sort(key=lambda c: (not c.fits, -c.corrected_tok_s))
    return out


def _correct(cands: list[Candidate], runs: list[dict], model_name: str) -> None:
    mine = [r for r in runs if r.get("model") in (model_name, os.path.basename(str(model_name)))]
    if not mine:
        return
    ratios = []
    by_cfg = {json.dumps(c.config(), sort_keys=True): c for c in cands}
    for r in mine:
        c = by_cfg.get(json.dumps(r.get("config", {}), sort_keys=True))
        if c is not None:
            ratios.append(float(r["tokens_per_s"]) / c.predicted_tok_s)
    scale = math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if ratios else 1.0
    for c in cands:
        c.corrected_tok_s = c.predicted_tok_s * scale
        c.why = f"scaled x{scale:.2f} by {len(ratios)} measured run(s)" if ratios else ""
    for r in mine:
        c = by_cfg.get(json.dumps(r.get("config", {}), sort_keys=True))
        if c is not None:
            c.corrected_tok_s = float(r["tokens_per_s"])
            c.why = "measured"


def explain(cands: list[Candidate], shape: ModelShape, budget: float, used_trace: bool) -> str:
    best = cands[0]
    lines = [f"Best: {best.precision} weights, threads {best.threads}"
             + (f", expert cache {best.cache_experts} experts ({best.cache_frac:.0%}), policy {best.policy}, "
                f"prefetch {'on' if best.prefetch else 'off'}" if shape.is_moe else "")
             + f": {best.corrected_tok_s:.1f} tok/s predicted."]
    if not best.fits:
        lines.append(f"Nothing fits the {budget / 1e9:.1f} GB budget: the non-expert weights plus KV exceed it.")
    alt = [c for c in cands if c.precision != best.precision and c.fits]
    if alt:
        lines.append(f"Next precision: {alt[0].precision} at {alt[0].corrected_tok_s:.1f} tok/s; lower precision "
                     "reads fewer bytes per token, and decode on this machine is memory-bound.")
    if shape.is_moe and best.cache_frac < 1.0:
        src = "replaying the routing trace" if used_trace else "uniform routing (no trace given, so policies tie)"
        lines.append(f"Hit rate {best.hit_rate:.0%} from {src}; misses are read from disk.")
    if best.why:
        lines.append(f"History: {best.why}.")
    return "\n".join(lines)
