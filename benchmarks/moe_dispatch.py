"""Where a MoE block's expert should switch from the native grouped call to dequantize + GEMM, per format.

One expert at OLMoE's shape (hidden 2048, moe_intermediate 1024) gets c rows. Two ways to run them, as
SparseMoeBlock runs an expert's rows in a step of more than NATIVE_MAX_TOKENS rows:

- `native`: the grouped call of cpu_moe.c (moe_native.NativeExperts) on the c rows, the multi-row GEMVs reading
  the stored format;
- `module`: the expert module (its QuantLinear dequantizes the whole weight and calls oneDNN's bf16 matmul
  above GEMV_MAX_ROWS rows).

Both gather the expert's rows from the step's and add its output back, as the block does.

Each call runs on the next of several copies of the expert (more than the L3 cache together), so weights come
from memory as in a real step. CPU milliseconds per call, best and median of --reps; the last column is the
largest row count up to which `native` was no slower at every count above GEMV_MAX_ROWS (the threshold for
moe_native.NATIVE_ROWS).

    .venv/bin/python benchmarks/moe_dispatch.py --threads 1 --json docs/benchmarks/moe_dispatch.json
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

from strata.layers.mlp import MLP
from strata.layers.moe_native import NativeExperts
from strata.layers.quant_linear import GEMV_MAX_ROWS, QuantLinear
from strata.quant import kquant

FORMATS = {"bf16": None, "int4 (Q4_0)": "int4-g32", "int8": "int8", "q4_k": "q4_k"}
ROWS = [1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64]


def _expert(fmt: str | None, hidden: int, inter: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    e = MLP(hidden, inter).to(torch.bfloat16).requires_grad_(False)
    for n in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(e, n)
        lin.weight.data = torch.randn_like(lin.weight) * 0.02
        if fmt in kquant.BLOCK_BYTES:  # K-quant blocks as a GGUF file holds them
            q = QuantLinear(lin.in_features, lin.out_features, fmt, bias=False)
            q.qweight = kquant.random_blocks(fmt, lin.out_features, lin.in_features, seed=seed)
            q.post_load("native")
            setattr(e, n, q)
        elif fmt is not None:
            setattr(e, n, QuantLinear.from_float(lin, fmt, backend="native"))
    e.fuse_projections()
    return e


def _time(fns, calls: int, reps: int) -> list[tuple[float, float]]:
    """(best, median) ms per call of each of `fns`, their passes alternating so that all see the same
    disturbance from other jobs on the cores (timing one after the other skewed the ratio by up to 1.5x)."""
    samples = [[] for _ in fns]
    for _ in range(reps):
        for fn, s in zip(fns, samples):
            t = time.process_time()
            for i in range(calls):
                fn(i)
            s.append((time.process_time() - t) * 1e3 / calls)
    return [(min(s), statistics.median(s)) for s in samples]


def measure(fmt: str | None, hidden: int, inter: int, copies: int, reps: int) -> list[dict]:
    experts = nn.ModuleList([_expert(fmt, hidden, inter, seed=i) for i in range(copies)])
    native = NativeExperts.build(experts)
    assert native is not None, "the native grouped call does not take these experts"
    rows = []
    for c in ROWS:
        x = torch.randn(2 * c, hidden, dtype=torch.bfloat16)  # [2c, H] the step's rows
        idx = torch.arange(0, 2 * c, 2)  # [c] the expert's rows among them
        w = torch.full((c, 1), 0.5, dtype=torch.bfloat16)  # [c, 1]
        ids = [torch.full((c, 1), i, dtype=torch.int64) for i in range(copies)]  # [c, 1] each
        out = torch.zeros_like(x)

        def run_native(i, x=x, idx=idx, w=w, ids=ids, out=out):  # as SparseMoeBlock._few_rows_native
            out.index_add_(0, idx, native(x.index_select(0, idx), w, ids[i % copies]))

        def run_module(i, x=x, idx=idx, w=w, out=out):  # as SparseMoeBlock's loop over experts
            out.index_add_(0, idx, (experts[i % copies](x.index_select(0, idx)) * w).to(x.dtype))

        (n_best, n_med), (m_best, m_med) = _time([run_native, run_module], copies, reps)
        rows.append({"rows": c, "native_ms": n_best, "native_median_ms": n_med, "module_ms": m_best,
                     "module_median_ms": m_med})
    return rows


def threshold(rows: list[dict]) -> int:
    """The largest row count up to which the native call was no slower (best times) at every measured count
    above GEMV_MAX_ROWS (up to there the module runs the same GEMV kernel: the two differ by noise only)."""
    best = GEMV_MAX_ROWS
    for r in rows:
        if r["rows"] <= GEMV_MAX_ROWS:
            continue
        if r["native_ms"] > r["module_ms"]:
            break
        best = r["rows"]
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--copies", type=int, default=8, help="experts cycled through, so weights come from memory")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated, from: " + ", ".join(FORMATS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    print(f"{'format':<12} {'rows':>4} {'native ms':>10} {'module ms':>10} {'native/module':>13}")
    for label in args.formats.split(","):
        rows = measure(FORMATS[label], args.hidden, args.inter, args.copies, args.reps)
        for r in rows:
            print(f"{label:<12} {r['rows']:>4} {r['native_ms']:>10.2f} {r['module_ms']:>10.2f} "
                  f"{r['native_ms'] / r['module_ms']:>13.2f}")
        results[label] = {"rows": rows, "threshold": threshold(rows)}
        print(f"{label:<12} native no slower up to {results[label]['threshold']} rows")
    if args.json:
        facts = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
                 "load_average": os.getloadavg(), "hidden": args.hidden, "inter": args.inter}
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps({"facts": facts, "results": results}, indent=1))
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
