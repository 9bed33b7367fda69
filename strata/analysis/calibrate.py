"""Fit the few efficiency factors the physics leaves open, on the measurements shipped in the repo
(strata/analysis/data/published_perf.csv), and measure how well they generalise (leave-one-out and
leave-one-source-out).

Parameters (kept under a fifth of the rows): per hardware class the share of peak bandwidth it reaches (eta_bw)
and, where it has prompt or batched rows, the share of peak FLOPs (eta_flops); shared by all classes the share of
bandwidth a dequantizing GEMV keeps (eta_q); one per-call overhead for GPUs and Apple GPUs; the GPU host time
per sequence (seq_us); and two engine ratios on the matmul FLOPs share, one for llama.cpp's own kernels and one for
the engines that run NVIDIA's GEMM libraries (TensorRT-LLM, FasterTransformer, vLLM / SGLang), whose prior is a
measured share of peak (efficiency.SHARE_PRIORS: cuBLAS FP8 on an H100). Everything else stays at the physical
priors in efficiency.py (llama.cpp builds from before May 2024 keep their measured 1.5x per-call overhead prior).
Loss: sum over rows of |log(pred / measured)| plus PULL x |log(value / prior)| per parameter; coordinate descent
over bounded grids. Run: `strata analyze --calibrate` (writes calibration.json next to this file).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from strata.analysis.efficiency import (
    BOUNDS,
    CALIBRATION_PATH,
    CUBLAS,
    DEFAULT,
    ENGINE_PARENTS,
    NEUTRAL,
    PRIORS,
    RATIO_PRIORS,
    SHARE_PRIORS,
    Eff,
    Efficiencies,
)
from strata.analysis.validate import Case, load_cases, score
from strata.fileio import write_json_atomic

DATA_PATH = Path(__file__).parent / "data" / "published_perf.csv"
PULL = 0.5  # weight of |log(value / prior)| per parameter
SWEEPS = 4
COMPUTE_METRICS = ("prefill_tok_s", "ttft_ms", "throughput_tok_s")
# classes whose per-call overhead is fitted, one value for both: GPU kernel launches (CUDA / ROCm, Metal's command
# encoding); CPU classes keep the prior, a function call and a thread barrier
LAUNCH_CLASSES = ("gpu", "apple")
# Engines whose matmul FLOPs share gets a ratio on the class factor; the engines of one tuple share it. llama.cpp runs
# its own kernels (MMQ, the dequantize + GEMM path, the CPU tiles); TensorRT-LLM, FasterTransformer (the library it
# grew out of) and vLLM / SGLang run their prompt and batched matmuls through cuBLAS / CUTLASS GEMMs, as llama.cpp
# does its fp16 ones (efficiency.CUBLAS)
ENGINE_FLOPS_RATIOS = (("llama.cpp",), ("trt-llm", "fastertransformer", "vllm", CUBLAS))
GRIDS = {
    "eta_bw": np.geomspace(BOUNDS["eta_bw"][0], 1.0, 64),
    "eta_flops": np.geomspace(BOUNDS["eta_flops"][0], 1.0, 64),
    "overhead_us": np.concatenate([[0.0], np.geomspace(0.1, BOUNDS["overhead_us"][1], 48)]),
    "eta_q": np.geomspace(BOUNDS["eta_q"][0], 1.0, 32),
    "seq_us": np.concatenate([[0.0], np.geomspace(0.5, BOUNDS["seq_us"][1], 48)]),
}
RATIO_GRID = {"eta_flops": np.geomspace(0.1, 2.0, 48)}


@dataclass(frozen=True)
class Param:
    """One fitted number: an Eff field, set on every table key in `keys` (tied)."""

    field: str
    keys: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.field}[{'+'.join(self.keys)}]"

    @property
    def is_ratio(self) -> bool:
        return self.keys[0].startswith("*|")


def _prior(key: str) -> Eff:
    if key.startswith("*|"):
        return RATIO_PRIORS.get(key, NEUTRAL)
    return PRIORS.get(key, DEFAULT)


def _classes(case: Case) -> set[str]:
    return {g.split("|")[0] for g in case.groups}


def _engines(case: Case) -> set[str]:
    return {g.split("|", 1)[1] for g in case.groups}


def fit_rows(cases: list[Case]) -> list[Case]:
    """Rows the factors are fitted on: predictable, and not resting on an assumed quantization (a wrong guess
    would be absorbed into the factors); the others are still predicted and scored."""
    return [c for c in cases if not c.reason and "assumed quantization" not in c.flags]


def parameters(cases: list[Case]) -> list[Param]:
    """The fitted parameters: only those some fitted row informs."""
    usable = fit_rows(cases)
    classes = sorted(set().union(*(_classes(c) for c in usable)))
    compute = {k for c in usable if c.metric in COMPUTE_METRICS or c.batch >= 32 for k in _classes(c)}
    out = [Param("eta_bw", (k,)) for k in classes] + [Param("eta_flops", (k,)) for k in classes if k in compute]
    out.append(Param("eta_q", tuple(classes)))
    launch = tuple(k for k in classes if k in LAUNCH_CLASSES)
    if launch:
        out.append(Param("overhead_us", launch))
    if any(c.batch > 1 for c in usable if "gpu" in _classes(c)):
        out.append(Param("seq_us", ("gpu",)))
    for engs in ENGINE_FLOPS_RATIOS:
        if any(set(engs) & _engines(c) and c.metric in COMPUTE_METRICS for c in usable):
            out.append(Param("eta_flops", tuple(f"*|{e}" for e in engs)))
    return out


def _start(params: list[Param]) -> Efficiencies:
    table = {k: _prior(k) for p in params for k in p.keys}
    table.update({k: v for k, v in RATIO_PRIORS.items()})
    return Efficiencies(table)


def _touching(cases: list[Case], p: Param) -> list[Case]:
    if p.is_ratio:  # an engine's ratio also acts on its dated builds (efficiency.ENGINE_PARENTS)
        names = {k[2:] for k in p.keys}
        return [c for c in cases if any({e, ENGINE_PARENTS.get(e)} & names for e in _engines(c))]
    return [c for c in cases if _classes(c) & set(p.keys)]


def _penalty(effs: Efficiencies, p: Param) -> float:
    """PULL x |log(value / prior)| of one parameter at its current value. A ratio with a measured share prior
    (efficiency.SHARE_PRIORS) is pulled towards that share of peak: its prior is the share over its class's factor
    as fitted so far (the class factor itself is set by its own rows and prior)."""
    v = getattr(effs.table[p.keys[0]], p.field)
    if p.is_ratio and p.field == "eta_flops" and p.keys[0] in SHARE_PRIORS:
        cls, share = SHARE_PRIORS[p.keys[0]]
        return PULL * abs(math.log((effs.table.get(cls) or _prior(cls)).eta_flops * v / share))
    prior = getattr(_prior(p.keys[0]), p.field)
    off = 0.5 if p.field in ("overhead_us", "seq_us") else 0.0  # these may be 0
    return PULL * abs(math.log((v + off) / (prior + off)))


def _loss(rows: list[Case], effs: Efficiencies, p: Param) -> float:
    return sum(abs(math.log(max(c.predict(effs), 1e-12) / c.measured)) for c in rows) + _penalty(effs, p)


def _set(effs: Efficiencies, p: Param, v: float) -> None:
    for k in p.keys:
        effs.set(k, replace(effs.table[k], **{p.field: v}))


def fit(cases: list[Case], sweeps: int = SWEEPS) -> Efficiencies:
    """Coordinate descent over the parameters, each searched on its whole grid, from the priors."""
    usable = fit_rows(cases)
    params = parameters(usable)
    effs = _start(params)
    for _ in range(sweeps):
        for p in params:
            rows = _touching(usable, p)
            if not rows:
                continue
            grid = RATIO_GRID[p.field] if p.is_ratio else GRIDS[p.field]
            losses = []
            for v in map(float, grid):
                _set(effs, p, v)
                losses.append(_loss(rows, effs, p))
            _set(effs, p, float(grid[int(np.argmin(losses))]))
    return effs


def held_out_predictions(cases: list[Case], by_source: bool = False) -> dict[int, float]:
    """Prediction of each row by factors fitted from the priors without it (or without its whole source)."""
    out: dict[int, float] = {}
    usable = [c for c in cases if not c.reason]
    folds: dict[str, list[Case]] = {}
    for c in usable:
        folds.setdefault(c.row["source"] if by_source else str(c.index), []).append(c)
    for fold in folds.values():
        ids = {c.index for c in fold}
        effs = fit([c for c in usable if c.index not in ids])
        for c in fold:
            out[c.index] = c.predict(effs)
    return out


def summary(res: dict) -> dict:
    return {k: res[k] for k in ("coverage", "median_ape", "p90_ape", "gmean_ratio", "n_predicted", "n_unpredictable")}


def calibrate(path: str | Path = DATA_PATH, out: str | Path = CALIBRATION_PATH, held_out: bool = True) -> dict:
    """Fit on a measurements CSV, score it (fitted, leave-one-out, leave-one-source-out) and write `out`."""
    cases = load_cases(str(path))
    effs = fit(cases)
    params = parameters(cases)
    n_rows = len(fit_rows(cases))
    validation = {"fitted": summary(score(cases, effs))}
    if held_out:
        validation["leave_one_out"] = summary(score(cases, effs, held_out_predictions(cases)))
        validation["leave_one_source_out"] = summary(score(cases, effs, held_out_predictions(cases, by_source=True)))
    doc = {"_comment": "written by `strata analyze --calibrate` from the CSV named here; the factors not listed "
                       "in `parameters` are efficiency.py's priors; see docs/analysis.md",
           "csv": Path(path).name, "n_rows": n_rows, "n_parameters": len(params),
           "parameters": {p.name: getattr(effs.table[p.keys[0]], p.field) for p in params},
           "factors": effs.to_json(), "validation": validation}
    write_json_atomic(Path(out), doc, indent=1)
    return doc


def source_held_out_report(path: str | Path = DATA_PATH, worst: int = 15) -> dict:
    """Leave-one-source-out alone (a fraction of the full calibration's time; writes nothing): the score overall
    and by metric, and the rows it misses most with their held-out and fitted ratios predicted / measured."""
    cases = load_cases(str(path))
    effs = fit(cases)
    fitted = {r["index"]: r["ratio"] for r in score(cases, effs)["rows"]}
    res = score(cases, effs, held_out_predictions(cases, by_source=True))
    by_metric: dict[str, list[float]] = {}
    for r in res["rows"]:
        by_metric.setdefault(r["metric"], []).append(r["ape"])
    rows = sorted(res["rows"], key=lambda r: -r["ape"])[:worst]
    return {"n_parameters": len(parameters(cases)), "leave_one_source_out": summary(res),
            "by_metric": {m: {"n": len(a), "median_ape": float(np.median(a)), "p90_ape": float(np.quantile(a, 0.9))}
                          for m, a in sorted(by_metric.items())},
            "worst": [{"index": r["index"], "metric": r["metric"], "ratio": r["ratio"], "fitted_ratio": fitted[r["index"]],
                       "system": r["system"], "hardware": r["hardware"]} for r in rows]}


def main(argv: list[str]) -> int:
    """`python -m strata.analysis.calibrate [CSV]` refits and writes calibration.json (as `strata analyze
    --calibrate`); `--loso [CSV]` prints leave-one-source-out alone and writes nothing."""
    if argv and argv[0] == "--loso":
        print(json.dumps(source_held_out_report(argv[1] if len(argv) > 1 else DATA_PATH), indent=1))
        return 0
    doc = calibrate(argv[0] if argv else DATA_PATH)
    print(json.dumps({k: doc[k] for k in ("n_rows", "n_parameters", "parameters", "validation")}, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
