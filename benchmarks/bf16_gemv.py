"""bf16 weights on the native kernels against torch's float32 matmul, per shape and row count: the evidence for the
AVX2 build's routing in layers/linear.py (AVX2_GEMV_SMALL_MAX_ROWS, AVX2_GEMV_MAX_ROWS) and cpu_moe.c's gemv_once.

Three ways to run M bf16 rows through a bf16 weight [N, K]:

- `gemv`: gemv_bf16 (on AVX2 quant_cpu_gemv16_avx2.c);
- `gemm`: gemm_dq on the bf16 weight (quant_cpu_gemm.c; on AVX2 the AVX-512 code on half-width registers);
- `float32`: torch's float32 matmul with x and the weight widened to float32 on the call, what linear() does on the
  AVX2 build beyond `native_rows`.

Each call runs on the next of several copies of the weight (more than --rotate-mib together, so weights come
from memory or L3 as in a model's step). Process CPU time per call, best of --reps passes over the copies. The
summary gives, per shape, the rows up to which the GEMV beat the float32 matmul, next to the rows linear() gives
it. `--code DIR` imports strata from another checkout (e.g. to time its `gemv` alone with `--paths gemv`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bf16_gemv.py --out docs/benchmarks/bf16_gemv_avx2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, N, K): the bundled model's expert gate/up and down and its LM head, SmolLM2's q/o and MLP up, OLMoE's
# fused expert gate/up, its down and q/k/v/o-sized [2048, 2048], a 49152 x 576 LM head (SmolLM2's vocabulary)
SHAPES = [("bundled gate_up", 512, 160), ("bundled down", 160, 256), ("bundled head", 2048, 160),
          ("smollm2 q/o", 576, 576), ("smollm2 up", 1536, 576), ("olmoe gate_up", 2048, 2048),
          ("olmoe down", 2048, 1024), ("49152 x 576 head", 49152, 576)]
ROWS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 128]
PATHS = ("gemv", "gemm", "float32")


def measure(shape: tuple[str, int, int], rows: list[int], paths: list[str], rotate_bytes: int, reps: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from strata.layers.linear import bf16_lib

    lib = bf16_lib()
    name, n, k = shape
    g = torch.Generator().manual_seed(n + k)
    copies = [torch.randn(n, k, generator=g).bfloat16() for _ in range(max(2, rotate_bytes // (2 * n * k) + 1))]
    out = []
    for m in rows:
        x = torch.randn(m, k, generator=g).bfloat16()
        y = torch.empty(m, n, dtype=torch.bfloat16)
        calls = {
            "gemv": lambda w: lib.gemv_bf16(x.data_ptr(), m, k, w.data_ptr(), n, None, y.data_ptr(), 0),
            "gemm": lambda w: lib.gemm_dq(0, x.data_ptr(), m, k, w.data_ptr(), None, None, n, 0, None, y.data_ptr()),
            "float32": lambda w: F.linear(x.float(), w.float()).to(torch.bfloat16),
        }
        row = {"shape": name, "n": n, "k": k, "rows": m}
        for p in paths:
            best = float("inf")
            for _ in range(reps):
                t = time.process_time()
                for w in copies:
                    calls[p](w)
                best = min(best, (time.process_time() - t) / len(copies))
            row[f"{p}_us"] = best * 1e6
        out.append(row)
    return out


def summary(rows: list[dict]) -> dict:
    """Per shape: the rows up to which the GEMV beat float32 at every count measured, and linear()'s limit."""
    from strata.layers.linear import native_rows

    res = {}
    for name in dict.fromkeys(r["shape"] for r in rows):
        rs = [r for r in rows if r["shape"] == name]
        upto = 0
        for r in rs:
            if "gemv_us" not in r or "float32_us" not in r or r["gemv_us"] > r["float32_us"]:
                break
            upto = r["rows"]
        limit = max((r["rows"] for r in rs if native_rows(r["rows"], r["n"], r["k"])), default=0)
        res[name] = {"gemv_beat_float32_up_to": upto, "linear_native_rows_up_to": limit}
    return res


def markdown(payload: dict) -> str:
    paths = payload["args"]["paths"]
    head = "| shape (N x K) | rows | " + " | ".join(f"{p} us" for p in paths)
    ratios = [p for p in ("gemm", "float32") if p in paths and "gemv" in paths]
    head += "".join(f" | {p} / gemv" for p in ratios) + " |"
    lines = [head, "|---" * (2 + len(paths) + len(ratios)) + "|"]
    for r in payload["results"]:
        cells = [f"{r['shape']} ({r['n']} x {r['k']})", str(r["rows"])] + [f"{r[p + '_us']:.1f}" for p in paths]
        cells += [f"{r[p + '_us'] / r['gemv_us']:.2f}x" for p in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    if payload.get("summary"):
        lines += ["", "| shape | GEMV beat float32 up to (rows) | linear() gives the GEMV up to |", "|---|---|---|"]
        lines += [f"| {s} | {v['gemv_beat_float32_up_to']} | {v['linear_native_rows_up_to']} |"
                  for s, v in payload["summary"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--paths", default=",".join(PATHS), help="from: " + ", ".join(PATHS))
    ap.add_argument("--shapes", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--rotate-mib", type=int, default=64, help="weights rotated through (more than the L3)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--code", default=str(ROOT), help="the strata checkout to import")
    ap.add_argument("--out", help="path without extension: writes .json and .md")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(args.code).resolve()))
    sys.path.insert(1, str(ROOT))
    import torch

    from strata.fileio import write_json_atomic, write_text_atomic
    from strata.layers import quant_native

    torch.set_num_threads(1)
    paths = [p for p in args.paths.split(",") if p]
    if bad := [p for p in paths if p not in PATHS]:
        raise SystemExit(f"--paths: expected some of {', '.join(PATHS)}, got {', '.join(bad)}")
    names = args.shapes.split(",") if args.shapes else [s[0] for s in SHAPES]
    shapes = [s for s in SHAPES if s[0] in names]
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    for shape in shapes:
        results += measure(shape, rows, paths, args.rotate_mib << 20, args.reps)
    payload = {"machine": {"isa": quant_native.isa(), "cpus": os.cpu_count(), "platform": platform.platform(),
                           "load_avg": os.getloadavg(), "threads": 1},
               "args": {**vars(args), "paths": paths, "code": os.path.relpath(Path(args.code).resolve(), ROOT)},
               "results": results, "summary": summary(results) if {"gemv", "float32"} <= set(paths) else {}}
    text = markdown(payload)
    print(text)
    if args.out:
        write_json_atomic(args.out + ".json", payload)
        write_text_atomic(args.out + ".md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
