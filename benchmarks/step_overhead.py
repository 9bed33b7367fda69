"""Strata's host costs, measured: decode and prefill on thin twins of the benchmark models (the same layers,
experts and vocabulary, widths cut to 256: ~50 MB of weights per step), so the time is the engine's own work
(Python, native-call set-up, attention, sampling) and not weight traffic.

Three figures go to strata/analysis/strata_fit.json, which the cost model reads: the overhead per kernel call
((dense twin's bf16 decode step - the model's prediction of it without overhead) / its calls), the cost per
expert matrix call of the Python expert loop that offloaded experts run (the OLMoE twin decoded with and without
the native MoE call), and the same loop's cost per call in a prompt (the OLMoE twin's 128-token prefill). No run
of the real models enters them. Results: docs/benchmarks/step_overhead.json.

    .venv/bin/python benchmarks/step_overhead.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from strata.analysis.host_probe import PREFILL  # prompt tokens of the prefill measurement
from strata.fileio import write_json_atomic, write_text_atomic

TWINS = {"dense-1b-thin": "tinyllama-1.1b", "olmoe-1b-7b-thin": "olmoe-1b-7b"}


def run_twin(path: str, decode: int, threads: int, native_moe: bool = True) -> dict:
    """Decode step time (median over `decode` steps after a warm-up request) and the best prompt step, in a fresh
    interpreter; `native_moe=False` runs the experts in the Python loop (the path of prompts and offloaded
    experts). The same measurement `strata probe` makes on its own thin twins."""
    import torch

    from strata.analysis.host_probe import time_twin

    torch.set_num_threads(threads)
    return time_twin(Path(path), decode, threads, native_moe)


def _child(path: str, decode: int, threads: int, native_moe: bool = True) -> dict:
    from benchmarks.child import run_child

    res = run_child("benchmarks.step_overhead", "run_twin", path, decode, threads, native_moe)
    if "error" in res:
        raise SystemExit(f"{path}: decode failed: {res['error']}")
    return res


def _twin(name: str, fmt: str, looped: bool):
    """(shape, scenario) of a thin twin's batch-1 decode, as analysis_own_runs prices the full models; `looped`:
    experts behind a provider, Strata's Python loop."""
    from benchmarks.analysis_own_runs import scenario
    from benchmarks.synthetic import PRESETS
    from strata.analysis.shapes import find_preset, load_presets, shape_from_dict

    base = load_presets()[find_preset(TWINS[name])]["config"]
    twin = {k: PRESETS[name][k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                          "num_key_value_heads")}
    sc = scenario({"engine": "strata", "format": fmt})
    sc.prompt, sc.gen = 16, 64
    if looped:
        sc.offload, sc.cache_frac, sc.hit_rate = "experts", 1.0, 1.0
    return shape_from_dict(dict(base, **twin), name=name), sc


def twin_prediction(name: str, fmt: str, bw: float, looped: bool = False,
                    prefill: bool = False) -> tuple[float, float, float]:
    """(decode step, or `prefill` of PREFILL tokens, seconds the cost model predicts for the twin with no per-call
    overhead, its kernel calls, the calls of its routed expert ops); GEMMs at the kernel benchmark's bf16 rate."""
    from benchmarks.analysis_own_runs import gemm_tflops, system
    from strata.analysis.host_probe import price_without_host_costs

    shape, sc = _twin(name, fmt, looped)
    if prefill:
        sc.prompt = PREFILL
    return price_without_host_costs(shape, system(bw, {}, gemm_tflops()), sc, prefill)


def main() -> None:
    from benchmarks.quant import quantized_folder
    from benchmarks.synthetic import memory_bandwidth_gbs, synthetic_model
    from strata.analysis.efficiency import STRATA_FIT_PATH

    ap = argparse.ArgumentParser()
    ap.add_argument("--twins", default=",".join(TWINS))
    ap.add_argument("--formats", default="bf16,int8,int4-g64,fp8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "step_overhead.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    bw = memory_bandwidth_gbs()
    rows = []
    for name in args.twins.split(","):
        src = synthetic_model(name)
        for fmt in args.formats.split(","):
            path = str(quantized_folder(Path(src), fmt))
            res = [_child(path, args.decode, args.threads) for _ in range(args.rounds)]
            steps = [r["step_ms"] for r in res]
            t0, calls, _ = twin_prediction(name, fmt, bw)
            step = statistics.median(steps)
            rows.append({"twin": name, "format": fmt, "path": "native", "step_ms": step, "step_ms_rounds": steps,
                         "prefill_ms": statistics.median(r["prefill_ms"] for r in res),
                         "predicted_no_overhead_ms": t0 * 1e3, "calls": calls,
                         "overhead_us_per_call": max(step - t0 * 1e3, 0.0) * 1e3 / calls})
            print(json.dumps(rows[-1]), file=sys.stderr)
    fit = next((r for r in rows if r["twin"] == "dense-1b-thin" and r["format"] == "bf16"), None)
    loop = prefill_loop = None
    moe = next((r for r in rows if r["twin"] == "olmoe-1b-7b-thin" and r["format"] == "bf16"), None)
    if moe and fit:  # the same twin with its experts in the Python loop: the step difference is the loop's cost
        path = str(synthetic_model("olmoe-1b-7b-thin"))
        steps = [_child(path, args.decode, args.threads, native_moe=False)["step_ms"] for _ in range(args.rounds)]
        _, _, n_native = twin_prediction("olmoe-1b-7b-thin", "bf16", bw)
        _, _, n_loop = twin_prediction("olmoe-1b-7b-thin", "bf16", bw, looped=True)
        step = statistics.median(steps)
        # the loop's matrix calls replace the native calls (each at the per-call overhead); the rest is equal
        loop = ((step - moe["step_ms"]) * 1e3 + n_native * fit["overhead_us_per_call"]) / n_loop
        rows.append({"twin": "olmoe-1b-7b-thin", "format": "bf16", "path": "python loop", "step_ms": step,
                     "step_ms_rounds": steps, "expert_calls": n_loop, "loop_us_per_expert_call": loop})
        print(json.dumps(rows[-1]), file=sys.stderr)
        # a prompt always runs the loop, with sorting and gathers per expert: its own cost per matrix call
        t0, calls, n_pf = twin_prediction("olmoe-1b-7b-thin", "bf16", bw, prefill=True)
        pf = moe["prefill_ms"]
        prefill_loop = ((pf - t0 * 1e3) * 1e3 - (calls - n_pf) * fit["overhead_us_per_call"]) / n_pf
        rows.append({"twin": "olmoe-1b-7b-thin", "format": "bf16", "path": "prefill loop", "prefill_ms": pf,
                     "predicted_no_overhead_ms": t0 * 1e3, "expert_calls": n_pf,
                     "loop_us_per_expert_call": prefill_loop})
        print(json.dumps(rows[-1]), file=sys.stderr)
    machine = {"memory_read_gb_s": bw, "threads": args.threads, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M"), "rounds": args.rounds, "decode_steps": args.decode}
    write_json_atomic(args.out, {"machine": machine, "rows": rows})
    if fit:
        out = {"_comment": "written by benchmarks/step_overhead.py: Strata's host cost per kernel call (thin twin of "
                           "dense-1b, bf16 decode) and per expert matrix call of its Python expert loop (thin OLMoE "
                           "twin decoded with and without the native MoE call); no run of the benchmark models",
               "overhead_us_per_call": round(fit["overhead_us_per_call"], 2), "measured_on": "dense-1b-thin/bf16",
               "step_ms": round(fit["step_ms"], 3), "date": machine["date"]}
        if loop is not None:
            out["loop_us_per_expert_call"] = round(loop, 2)
            out["prefill_loop_us_per_expert_call"] = round(prefill_loop, 2)
        write_text_atomic(STRATA_FIT_PATH, json.dumps(out, indent=1) + "\n")
    print("| twin | format | step ms (median of rounds) | predicted without overhead ms | calls | us per call |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["path"] == "native":
            print(f"| {r['twin']} | {r['format']} | {r['step_ms']:.2f} | {r['predicted_no_overhead_ms']:.2f} | "
                  f"{r['calls']:.0f} | {r['overhead_us_per_call']:.1f} |")
        elif r["path"] == "python loop":
            print(f"| {r['twin']} (Python expert loop) | {r['format']} | {r['step_ms']:.2f} | | "
                  f"{r['expert_calls']:.0f} expert calls | {r['loop_us_per_expert_call']:.1f} per expert call |")
        else:
            print(f"| {r['twin']} (prefill of {PREFILL} tokens) | {r['format']} | {r['prefill_ms']:.2f} | "
                  f"{r['predicted_no_overhead_ms']:.2f} | {r['expert_calls']:.0f} expert calls | "
                  f"{r['loop_us_per_expert_call']:.1f} per expert call |")


if __name__ == "__main__":
    main()
