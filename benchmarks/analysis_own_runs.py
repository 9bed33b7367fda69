"""The performance model against Strata's own benchmark runs on this machine (issue 6).

Reads the recorded runs (docs/benchmarks/quant.json, core.json: decode and prefill per model and format) and the
kernel measurements (quant_kernels.json: share of the read bandwidth each quantized decode GEMV reaches;
bf16_gemv.json: the same for Strata's bf16 GEMV). Each run is predicted on the machine it ran on: the
bandwidth recorded in the run, Strata's GEMVs at their measured share of it, GEMM peak from the kernel run.
The only fitted number is Strata's per-kernel-call overhead, fitted on ONE run (dense-1b bf16 decode in
quant.json); every other run is held out. Writes docs/benchmarks/analysis_own_runs.{json,md}. No timing here.

    .venv/bin/python benchmarks/analysis_own_runs.py
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from strata.analysis.efficiency import PRIORS, Efficiencies
from strata.analysis.hardware import System, load_catalog
from strata.analysis.placement import Scenario
from strata.analysis.precision import STRATA_FORMATS, Precisions
from strata.analysis.predict import predict
from strata.analysis.shapes import load_shape

BENCH = ROOT / "docs" / "benchmarks"
SHAPES = {"dense-1b": "tinyllama-1.1b", "olmoe-1b-7b": "olmoe-1b-7b"}
PEER_FORMATS = {"q8_0": "q8_0", "q4_0": "q4_0", "bf16": "bf16"}
PROMPT, GEN = 128, 32  # benchmarks/core.py and quant.py defaults
TRAIN = ("quant.json", "dense-1b", "strata", "bf16")  # the one run the overhead is fitted on


def kernel_eff() -> dict[str, float]:
    """Decode (1 row) GEMV share of the read bandwidth per Strata format, from the kernel benchmarks."""
    out = {}
    for r in json.loads((BENCH / "quant_kernels.json").read_text())["results"]:
        if r["rows"] == 1 and r["case"] in STRATA_FORMATS:
            out[STRATA_FORMATS[r["case"]]] = r["roofline_frac"]
    for r in json.loads((BENCH / "bf16_gemv.json").read_text())["results"]:
        if r["rows"] == 1 and r["case"] == "bf16 native":
            out["bf16"] = r["roofline_frac"]
    return out


def gemm_tflops() -> float:
    """bf16 GEMM rate at 256 rows (prefill-sized) from the kernel benchmark."""
    d = json.loads((BENCH / "quant_kernels.json").read_text())
    best = min(r["best_ms"] for r in d["results"] if r["case"] == "bf16 F.linear" and r["rows"] == 256)
    return 2 * 256 * d["k"] * d["n"] / (best * 1e-3) / 1e12


def runs() -> list[dict]:
    out = []
    q = json.loads((BENCH / "quant.json").read_text())
    for r in q["rows"]:
        out.append({"file": "quant.json", "model": r["model"], "engine": r["engine"], "format": r["format"],
                    "bw": q["machine"]["memory_read_gb_s"], "decode": r["decode_tok_s"],
                    "prefill": r["prefill_tok_s"]})
    c = json.loads((BENCH / "core.json").read_text())
    for r in c["rows"]:
        if r["model"] in SHAPES:
            out.append({"file": "core.json", "model": r["model"], "engine": "strata", "format": "bf16",
                        "bw": c["machine"]["memory_read_gb_s"], "decode": r["strata"]["decode_tok_s"],
                        "prefill": r["strata"]["prefill_tok_s"]})
    return out


def system(bw: float, keff: dict[str, float], tflops: float) -> System:
    dev = load_catalog()["strata-dev"]
    return System(replace(dev, bandwidth_gbs=bw, kernel_eff=keff,
                          peak_tflops={"fp32": tflops / 2, "fp16": tflops, "int8": tflops}))


def scenario(run: dict) -> Scenario:
    if run["engine"] == "strata":
        prec = Precisions(STRATA_FORMATS[run["format"]], activations="bf16", kv="bf16", head="bf16")
    else:
        prec = Precisions(PEER_FORMATS[run["format"]], activations="fp16", kv="fp16")
    return Scenario(batch=1, prompt=PROMPT, gen=GEN, prec=prec, engine=run["engine"], offload="none")


def fit_overhead(train: dict, keff: dict[str, float], tflops: float) -> float:
    """Per-call overhead (us) that makes the training run's decode time match: t = t(0) + calls * ov."""
    effs = Efficiencies({"cpu-measured|strata": replace(PRIORS["cpu-measured|strata"], overhead_us=0.0)})
    shape = load_shape(SHAPES[train["model"]])
    p = predict(shape, system(train["bw"], keff, tflops), scenario(train), effs)
    calls = sum(s.launches for s in p.decode.segments)
    return max(1.0 / train["decode"] - p.tpot_s, 0.0) / calls * 1e6


def main() -> int:
    keff, tflops = kernel_eff(), gemm_tflops()
    all_runs = runs()
    train = next(r for r in all_runs if (r["file"], r["model"], r["engine"], r["format"]) == TRAIN)
    ov = fit_overhead(train, keff, tflops)
    effs = Efficiencies.load()
    effs.table["cpu-measured|strata"] = replace(PRIORS["cpu-measured|strata"], overhead_us=ov)
    rows = []
    for r in all_runs:
        p = predict(load_shape(SHAPES[r["model"]]), system(r["bw"], keff, tflops), scenario(r), effs)
        held = r is not train
        rows.append({**r, "held_out": held, "pred_decode": p.decode_tok_s, "pred_prefill": p.prefill_tok_s,
                     "decode_err": p.decode_tok_s / r["decode"] - 1, "prefill_err": p.prefill_tok_s / r["prefill"] - 1})
    doc = {"overhead_us_per_call": ov, "kernel_eff": keff, "gemm_tflops": tflops, "train": "/".join(TRAIN),
           "rows": rows}
    tmp = BENCH / "analysis_own_runs.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, BENCH / "analysis_own_runs.json")
    md = markdown(doc)
    tmp = BENCH / "analysis_own_runs.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, BENCH / "analysis_own_runs.md")
    print(md)
    return 0


def markdown(doc: dict) -> str:
    keff = ", ".join(f"{k} {v:.0%}" for k, v in doc["kernel_eff"].items())
    lines = [
        "# Performance model vs Strata's own runs (benchmarks/analysis_own_runs.py)", "",
        (f"Machine per run: the read bandwidth recorded in the run; Strata's decode GEMVs at their measured share of "
        f"it ({keff}; quant_kernels.json, bf16_gemv.json); bf16 GEMM {doc['gemm_tflops']:.2f} TFLOP/s (256 rows, "
        f"quant_kernels.json). Fitted: Strata's overhead per kernel call, **{doc['overhead_us_per_call']:.0f} us**, "
        f"on one run ({doc['train']} decode); every other run is held out. llama.cpp rows use the published "
        "calibration (class cpu-measured x llama.cpp ratio), not Strata's kernels."), "",
        ("| run | model | engine | format | bandwidth GB/s | decode meas. | decode pred. | error | prefill meas. "
        "| prefill pred. | error |"),
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        tag = r["file"] + ("" if r["held_out"] else " (fit)")
        lines.append(f"| {tag} | {r['model']} | {r['engine']} | {r['format']} | {r['bw']:.1f} | {r['decode']:.2f} | "
                     f"{r['pred_decode']:.2f} | {r['decode_err']:+.0%} | {r['prefill']:.0f} | {r['pred_prefill']:.0f} | "
                     f"{r['prefill_err']:+.0%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
