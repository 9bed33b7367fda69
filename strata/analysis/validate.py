"""Predict every row of a published-measurements CSV (the format of strata/analysis/data/published_perf.csv) and score it.

Each row becomes a Case (model shape, system, scenario, metric) whose prediction is a function of the
efficiency factors, so calibration can re-price it. Rows that cannot be predicted carry a reason and are
reported and counted, never dropped.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field

from strata.analysis.assumptions import offload_host, precisions, weight_formats
from strata.analysis.efficiency import CUBLAS, MAX_BENCH_BATCH, Efficiencies, source_date, versioned_engine
from strata.analysis.engines import EXPERT_OFFLOAD_FAMILIES, identify
from strata.analysis.hardware import System, parse_system, resolve_device
from strata.analysis.models import resolve_model
from strata.analysis.operators import kv_cache_bytes
from strata.analysis.placement import Scenario, plan_placement, step_cost
from strata.analysis.precision import canon
from strata.analysis.predict import max_batch
from strata.errors import ConfigError, StrataError

METRICS = ("decode_tok_s", "prefill_tok_s", "ttft_ms", "tpot_ms", "throughput_tok_s")
SHAREGPT_IN, SHAREGPT_OUT = 250, 200  # typical mean input/output tokens of ShareGPT benchmark traces
DEFAULT_PROMPT, DEFAULT_GEN = 32, 128  # decode rows that state no lengths (llama-bench tg128 style)


@dataclass
class Case:
    index: int
    row: dict
    metric: str
    measured: float
    groups: set[str] = field(default_factory=set)
    reason: str | None = None
    batch: int = 1  # sequences per step the prediction assumes (rows that say "max" get the KV-limited batch)
    notes: list[str] = field(default_factory=list)  # which entries names resolved to, what was assumed
    flags: list[str] = field(default_factory=list)  # weaker predictions: assumed quantization, unknown engine
    _fn: object = None

    def predict(self, effs: Efficiencies) -> float:
        return self._fn(effs)


def _int(v: str, default: int) -> int:
    m = re.match(r"^\s*(\d+)\s*$", v or "")
    return int(m.group(1)) if m else default


def _system(row: dict) -> System:
    hw = row["hardware"]
    parts = [p for p in re.split(r"\s\+\s", hw)]
    texts, notes = [], []
    whole, whole_how = resolve_device(hw)
    for p in parts:
        m = re.match(r"^\s*(\d+)\s*x\s+(.*)$", p)
        key, how = resolve_device(m.group(2) if m else p)
        if key is None and whole is not None and len(parts) > 1:  # one device described in parts ('NPU + NAND')
            texts, notes = [whole], [f"hardware {hw!r} -> {whole} ({whole_how})"]
            break
        if key is None:
            raise StrataError(f"hardware {p.strip()!r} not in the catalog")
        notes.append(f"hardware {p.strip()!r} -> {key} ({how})")
        texts.append(f"{m.group(1)}x{key}" if m else key)
    sys = parse_system("+".join(texts))
    sys.notes = notes
    said = (row.get("notes", "") + " " + row.get("system", "")).lower()
    if "layer split" in said or (sys.count > 1 and "tp" not in said and "dp" not in said):
        sys.parallel = "pp"
    if "i9-10900x" in hw.lower() and sys.host is None:
        sys.host = parse_system("i9-10900x").device
    bw = row.get("hardware_mem_bw_gbs", "")
    # CPU memory speed is a configuration choice, so the row's stated bandwidth overrides the catalog's.
    if bw and sys.device.cls.startswith("cpu") and sys.host is None:
        sys.device = type(sys.device)(**{**sys.device.__dict__, "bandwidth_gbs": float(bw)})
    if "measured" in hw.lower() and sys.host is not None:
        m = re.search(r"~?(\d+)\s*gb/s measured", hw.lower())
        if m:
            sys.host = type(sys.host)(**{**sys.host.__dict__, "bandwidth_gbs": float(m.group(1))})
    return sys


def build_case(i: int, row: dict) -> Case:
    metric = row["metric"].strip()
    case = Case(i, row, metric, float(row["value"]))
    try:
        _fill(case, row)
    except (StrataError, ConfigError) as e:
        case.reason = str(e)
    return case


def _fill(case: Case, row: dict) -> None:
    if case.metric not in METRICS:
        raise StrataError(f"metric {case.metric!r} not supported")
    text = row["system"] + " " + row.get("notes", "")
    if re.search(r"activation-sparse", row.get("notes", ""), re.IGNORECASE):
        raise StrataError("activation-sparse model (predictor-gated neurons) is not modelled")
    try:
        model = resolve_model(row["model"])
    except ConfigError:
        raise StrataError(f"model {row['model']!r} has no preset") from None
    shape = model.shape
    eng = identify(row["system"])
    fmts, how, assumed = weight_formats(row["dtype_or_quant"], eng, model)
    sys = _system(row)
    date = source_date(row["source"] + " " + row.get("notes", ""))
    engine = versioned_engine(row["system"], date)
    fmt = canon(fmts.get("experts", fmts["weights"]))
    kv = "fp8" if fmt in ("fp8", "nvfp4") and engine == "trt-llm" else "fp16"
    sc = Scenario(prec=precisions(fmts, kv=kv), engine=engine, build_date=date, engine_name=eng.name,
                  engine_version=eng.version)
    case.notes = model.notes + sys.notes + [eng.describe(), how]
    host_note = offload_host(sys, eng, shape, sc.prec)
    if host_note:
        case.notes.append(host_note)
        case.flags.append("assumed host")
    if assumed:
        case.flags.append("assumed quantization")
    if not eng.is_known:
        case.flags.append("physics-only (unknown engine)")
    m = re.search(r"-ngl (\d+)", text)
    if m:
        sc.gpu_layers = int(m.group(1))
    m = re.search(r"--n-cpu-moe (\d+)", text)
    if m:
        sc.cpu_moe_layers = int(m.group(1))
    if row.get("offload") == "cpu" and sc.cpu_moe_layers == 0 and sc.gpu_layers is None and shape.is_moe:
        sc.cpu_moe_layers = shape.layers  # experts on the CPU (KTransformers, Fiddler)
    if eng.family in EXPERT_OFFLOAD_FAMILIES and shape.is_moe and sys.host is not None:
        sc.offload = "experts"  # experts in host memory behind the engine's GPU expert cache
    if row["prompt_tokens"].strip() == "ShareGPT":
        sc.prompt, sc.gen = SHAREGPT_IN, SHAREGPT_OUT
    else:
        sc.prompt = _int(row["prompt_tokens"], DEFAULT_PROMPT if case.metric != "prefill_tok_s" else 512)
        sc.gen = _int(row["gen_tokens"], DEFAULT_GEN)
    b = row["batch"].strip().lower()
    cap = None
    if b.isdigit():
        sc.batch = int(b)
    else:
        m = re.search(r"(\d+)", b)
        cap = min(int(m.group(1)) if m else 8192, MAX_BENCH_BATCH.get(engine, 8192))
        sc.batch = cap if "concurrency" in b else 0
    if sc.batch == 0:
        sc.batch = max_batch(shape, sys, sc, sc.prompt + sc.gen, cap or 8192)
    case.batch = sc.batch
    plan = plan_placement(shape, sys, sc, kv_cache_bytes(shape, sc.prec, sc.batch, sc.prompt + sc.gen))
    case.groups = {f"{sys.device.cls}|{engine}"} | ({f"{sys.host.cls}|{engine}"} if sys.host else set())
    if engine.startswith("llama.cpp") and sys.device.cls == "gpu":  # its fp16 GEMMs run in cuBLAS (placement.py)
        case.groups.add(f"gpu|{CUBLAS}")
    metric, bsz = case.metric, sc.batch
    if metric == "prefill_tok_s":
        pre = step_cost(shape, sys, sc, plan, 1, sc.prompt, 0)
        case._fn = lambda e: sc.prompt / pre.time(e)
        return
    dec = step_cost(shape, sys, sc, plan, bsz, 1, sc.prompt + sc.gen // 2)
    if metric == "decode_tok_s":
        case._fn = lambda e: 1.0 / dec.time(e)
    elif metric == "tpot_ms":
        if row["prompt_tokens"].strip() == "ShareGPT":  # continuous batching interleaves prefill chunks
            chunk = step_cost(shape, sys, sc, plan, 1, sc.prompt, 0)
            case._fn = lambda e: 1e3 * (dec.time(e) + bsz * chunk.time(e) / sc.gen)
        else:
            case._fn = lambda e: 1e3 * dec.time(e)
    elif metric == "ttft_ms":
        pre = step_cost(shape, sys, sc, plan, bsz, sc.prompt, 0)
        case._fn = lambda e: 1e3 * pre.time(e)
    else:  # throughput: the batch's prompts once, then gen decode steps
        pre = step_cost(shape, sys, sc, plan, bsz, sc.prompt, 0)
        case._fn = lambda e: bsz * sc.gen / (pre.time(e) + sc.gen * dec.time(e))


def load_cases(path: str) -> list[Case]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (expected a measurements CSV)") from None
    need = {"model", "dtype_or_quant", "hardware", "batch", "prompt_tokens", "gen_tokens", "metric", "value"}
    if rows and not need <= set(rows[0]):
        raise ConfigError(f"{path}: missing columns {sorted(need - set(rows[0]))}")
    return [build_case(i, r) for i, r in enumerate(rows)]


def score(cases: list[Case], effs: Efficiencies, held_out: dict[int, float] | None = None) -> dict:
    """Per-row predictions and errors; `held_out` replaces predictions (leave-one-out) where given."""
    out_rows, apes, logs, skipped = [], [], [], []
    for c in cases:
        r = {"index": c.index, "model": c.row["model"], "hardware": c.row["hardware"], "system": c.row["system"],
             "metric": c.metric, "measured": c.measured}
        if c.reason:
            r["reason"] = c.reason
            skipped.append(r)
            continue
        pred = held_out[c.index] if held_out and c.index in held_out else c.predict(effs)
        ape = abs(pred - c.measured) / c.measured
        r.update(predicted=pred, ape=ape, ratio=pred / c.measured, batch=c.batch, notes=c.notes, flags=c.flags)
        apes.append(ape)
        logs.append(math.log(pred / c.measured))
        out_rows.append(r)
    total = len(out_rows) + len(skipped)
    return {"coverage": len(out_rows) / total if total else float("nan"),
            "median_ape": _quantile(apes, 0.5), "p90_ape": _quantile(apes, 0.9),
            "gmean_ratio": math.exp(sum(logs) / len(logs)) if logs else float("nan"),
            "n_predicted": len(out_rows), "n_unpredictable": len(skipped), "rows": out_rows, "unpredictable": skipped}


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
