"""The native batched GEMM (quant_cpu_gemm.c) against the paths it replaces, per format, shape and row count.

The ways QuantLinear can run M bf16 rows through a quantized weight (its `gemv_max_rows` / `gemm_max_rows`
pick one):

- `gemv`: the GEMVs of quant_cpu_*.c, one pass over the weight per 4 rows (q4_1's and q8_0's hand 2 rows or
  more to the GEMM, so their column repeats the GEMM's there);
- `gemm`: the GEMM, weight tiles dequantized to bf16 in cache once, bf16 dot products on them;
- `dequant+oneDNN`: the weight dequantized to bf16 in row tiles of 4 MiB, each through torch's bf16 matmul;
- `a8` (formats with one): int8 activations on AVX-512 VNNI (`--quantized-activations int8`).

On the AVX2 build (no AVX-512) `gemm` is the kernel on int16 activations for the formats it has
(quant_cpu_q32x16_avx2.c; 8 x rows at a time from 7 rows; `gemv` runs the same kernel, so those two columns
differ by noise only), and the last column is `float32 tiles`: the weight in
float32 row tiles through torch's float32 matmul, where QuantLinear switches at `avx2_float32_min_rows`
(AVX2_*_FLOAT32_MIN_ROWS); the summary then gives the rows up to which the GEMM beat those.

Each call runs on the next of several copies of the layer (more than --rotate-mib of weights together), so
weights come from memory as in a model's step. Process CPU time per call (other jobs on the cores inflate wall
time, not this), best and median of --reps passes over the copies. The summary gives, per case, the rows from
which the GEMM beat the GEMV and up to which it beat dequant+oneDNN (QuantLinear's GEMV_MAX_ROWS and
GEMM_MAX_ROWS).

`--float32` times float32 rows through GGUF's 32-weight blocks instead: the native float32 GEMV (each x split into
two bf16 halves) against the exact float32 tiles, and gives the rows up to which the GEMV won (QuantLinear's
F32_GEMV_MAX_ROWS and AVX2_F32_GEMV_MAX_ROWS*).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant_gemm.py --out docs/benchmarks/quant_gemm
    .venv/bin/python benchmarks/quant_gemm.py --float32 --threads 2 --cases q4_1:1536x576,q4_1:576x1536,q8_0:49152x576
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
from torch import nn

from strata.fileio import write_text_atomic
from strata.layers import quant_native
from strata.layers.quant_linear import QuantLinear
from strata.quant import ggml_blocks, kquant

# (format, out_features N, in_features K): SmolLM2-135M's MLP up/gate and down, its tied q8_0 LM head, an
# OLMoE-sized expert projection in Q4_0 (int4-g32)
CASES = [("q4_1", 1536, 576), ("q4_1", 576, 1536), ("int4-g32", 1536, 576), ("q8_0", 1536, 576),
         ("q8_0", 49152, 576), ("int4-g32", 2048, 2048)]
ROWS = [1, 2, 4, 5, 8, 16, 32, 64, 128, 256]
BIG = 1 << 30
# path -> (gemv_max_rows, gemm_max_rows, quantized_activations, avx2_float32_min_rows)
PATHS = {"gemv": (BIG, 0, "none", BIG), "gemm": (0, BIG, "none", BIG), "dequant+oneDNN": (0, 0, "none", BIG),
         "a8": (0, 0, "int8", BIG)}
# on the AVX2 build (quant_native.isa() == "avx2") "gemm" is the int16-activation kernel for the formats it has,
# torch's bf16 matmul is no contender, and the float32 tiles are what QuantLinear switches to
AVX2_PATHS = {"gemv": PATHS["gemv"], "gemm": PATHS["gemm"], "float32 tiles": (0, 0, "none", 0)}
# --float32: float32 rows into GGUF's 32-weight blocks, the native float32 GEMV (x split into two bf16 halves) or the
# exact float32 tiles in torch's float32 matmul (QuantLinear switches past _f32_gemv_max_rows)
F32_PATHS = {"float32 gemv": (BIG, 0, "none", BIG), "float32 tiles": (0, 0, "none", BIG)}


def _layer(fmt: str, n: int, k: int, seed: int) -> QuantLinear:
    if fmt in kquant.BLOCK_BYTES or fmt in ggml_blocks.BLOCK_BYTES:  # GGUF blocks: random valid ones
        q = QuantLinear(k, n, fmt)
        q.qweight = (kquant if fmt in kquant.BLOCK_BYTES else ggml_blocks).random_blocks(fmt, n, k, seed=seed)
        q.post_load("native")
        return q
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=False)
    lin.weight.data.normal_(0, 0.02)
    return QuantLinear.from_float(lin, fmt, backend="native")


def _copies(fmt: str, n: int, k: int, rotate_bytes: int) -> list[QuantLinear]:
    first = _layer(fmt, n, k, seed=0)
    count = max(2, -(-rotate_bytes // first.fmt.nbytes(n, k)))
    layers = [first]
    for _ in range(count - 1):
        q = QuantLinear(k, n, fmt)
        for name, t in first._tensors().items():
            setattr(q, name, t.clone())
        q.post_load("native")
        layers.append(q)
    return layers


def _time(layers: list[QuantLinear], x: torch.Tensor, reps: int) -> tuple[float, float]:
    """(best, median) CPU milliseconds per call over passes through all copies (one warm-up pass)."""
    samples = []
    for r in range(reps + 1):
        t = time.process_time()
        for q in layers:
            q(x)
        if r:
            samples.append((time.process_time() - t) * 1e3 / len(layers))
    return min(samples), statistics.median(samples)


def measure(fmt: str, n: int, k: int, rows: list[int], rotate_bytes: int, reps: int,
            float32: bool = False) -> list[dict]:
    layers = _copies(fmt, n, k, rotate_bytes)
    paths = F32_PATHS if float32 else AVX2_PATHS if quant_native.isa() == "avx2" else PATHS
    out = []
    for m in rows:
        x = torch.randn(m, k).to(torch.float32 if float32 else torch.bfloat16)  # [M, K]
        row = {"rows": m}
        for path, (gemv_rows, gemm_rows, acts, f32_rows) in paths.items():
            if acts == "int8" and not layers[0]._a8:
                continue
            for q in layers:
                q.gemv_max_rows, q.gemm_max_rows, q.quantized_activations = gemv_rows, gemm_rows, acts
                q.avx2_float32_min_rows = f32_rows
            best, med = _time(layers, x, reps)
            row[path] = {"best_ms": round(best, 4), "median_ms": round(med, 4),
                         "gflops": round(2 * m * n * k / best / 1e6, 1)}
        out.append(row)
    return out


def _beyond(row: dict) -> str:
    """The path past the GEMM: float32 tiles on the AVX2 build, else dequant+oneDNN."""
    return "float32 tiles" if "float32 tiles" in row else "dequant+oneDNN"


def thresholds(rows: list[dict]) -> dict:
    """gemm_from: the fewest rows from which the GEMM beat the GEMV at every measured count (best times);
    gemm_upto: the most rows up to which it beat the path beyond it (_beyond) at every count from gemm_from.
    --float32 rows: gemv_upto, the most rows up to which the float32 GEMV beat the float32 tiles at every count."""
    if "float32 gemv" in rows[0]:
        upto = None
        for r in rows:
            if r["float32 gemv"]["best_ms"] > r["float32 tiles"]["best_ms"]:
                break
            upto = r["rows"]
        return {"gemv_upto": upto}
    counts = [r["rows"] for r in rows]
    beats_gemv = [r["gemm"]["best_ms"] < r["gemv"]["best_ms"] for r in rows]
    start = next((i for i in range(len(rows)) if all(beats_gemv[i:])), None)
    upto = None
    avx2 = _beyond(rows[0]) == "float32 tiles"  # gemv and gemm: the same int16 kernel there, from the first row
    for r in rows[0 if avx2 else start or 0:]:
        if r["gemm"]["best_ms"] > r[_beyond(r)]["best_ms"]:
            break
        upto = r["rows"]
    return {"gemm_from": None if start is None else counts[start], "gemm_upto": upto}


def markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = ["# Batched quantized GEMM (benchmarks/quant_gemm.py)", "",
             (f"CPU: {m['cpu']}, {m['threads']} thread(s), torch {m['torch']}, process CPU time, weights rotated "
              f"over {payload['rotate_mib']} MiB; load average {', '.join(f'{v:.1f}' for v in m['load_avg'])} "
              "(other jobs shared the cores). Best of the passes, ms per call (GFLOP/s)."), ""]
    for case in payload["cases"]:
        paths = [p for p in case["results"][0] if p != "rows"]
        lines += [f"## {case['format']} [{case['n']}, {case['k']}]", "",
                  "| rows | " + " | ".join(paths) + " |", "|---|" + "---|" * len(paths)]
        for r in case["results"]:
            lines.append(f"| {r['rows']} | " + " | ".join(
                f"{r[p]['best_ms']:.3f} ({r[p]['gflops']:.0f})" for p in paths) + " |")
        t = case["thresholds"]
        if "gemv_upto" in t:
            lines += ["", f"Float32 GEMV faster than the float32 tiles up to {t['gemv_upto']} rows.", ""]
            continue
        gemv = (f"faster than the GEMV from {t['gemm_from']} rows" if t["gemm_from"] is not None
                else "never faster than the GEMV path")
        beyond = _beyond(case["results"][0])
        lines += ["", f"GEMM {gemv}, faster than {beyond} up to {t['gemm_upto']} rows.", ""]
    return "\n".join(lines)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(f"{f}:{n}x{k}" for f, n, k in CASES),
                    help="comma-separated FORMAT:NxK (out x in features)")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rotate-mib", type=int, default=128, help="weights rotated through (more than the L3)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--float32", action="store_true",
                    help="float32 rows: the float32 GEMV against the float32 tiles (GGUF's 32-weight blocks)")
    ap.add_argument("--out", help="path without extension: writes .json and .md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    cases = []
    for spec in args.cases.split(","):
        fmt, shape = spec.split(":")
        n, k = (int(v) for v in shape.split("x"))
        results = measure(fmt, n, k, rows, args.rotate_mib << 20, args.reps, args.float32)
        cases.append({"format": fmt, "n": n, "k": k, "results": results, "thresholds": thresholds(results)})
        for r in results:
            print(f"{fmt:>9} [{n},{k}] M={r['rows']:4d} " + "  ".join(
                f"{p} {v['best_ms']:.3f}" for p, v in r.items() if p != "rows"), file=sys.stderr)
    machine = {"cpu": _cpu_name(), "threads": args.threads, "torch": torch.__version__,
               "python": platform.python_version(), "load_avg": os.getloadavg()}
    payload = {"machine": machine, "rotate_mib": args.rotate_mib, "cases": cases}
    table = markdown(payload)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out.with_suffix(".json"), json.dumps(payload, indent=1) + "\n")
        write_text_atomic(out.with_suffix(".md"), table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
