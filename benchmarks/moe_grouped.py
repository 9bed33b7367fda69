"""The grouped MoE call (moe_decode_batch in cpu_moe.c) on one OLMoE-shaped layer of bf16 experts.

64 experts of random bf16 weights (hidden 2048, moe_intermediate 1024, top-8), routed at random, as a decode
step of S sequences (one row each) or a mixed step (S decodes + a prompt's tokens) sends them: each distinct
expert streams its fused gate/up [2I, H] and down [H, I] weights once, for all of its rows (GEMV up to MB16 rows,
the GEMM above). The layer's weights (805 MB) are far beyond the L3 cache, so they come from memory.

Per case: CPU ms per call (best and median of --reps calls, each with new routing), distinct experts per call,
GB/s of their weight bytes, and GFLOP/s of the expert matmuls. No GGUF needed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/moe_grouped.py --json moe_grouped.json
"""

from __future__ import annotations

import argparse
import ctypes
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

from strata.layers.quant_native import WEIGHT_KINDS, native_lib

CASES = [("1 decode", 1), ("4 decodes", 4), ("15 decodes", 15), ("15 decodes + 55-token prompt", 70)]


def _tables(experts: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
    """The six pointer tables of moe_decode_batch: gate/up weight, scales, zeros, then the same for down."""
    n = len(experts)
    gu = (ctypes.c_void_p * n)(*(g.data_ptr() for g, _ in experts))
    d = (ctypes.c_void_p * n)(*(w.data_ptr() for _, w in experts))
    none = (ctypes.c_void_p * n)()
    return [gu, none, none, d, none, none]


def run_case(lib, tables, rows: int, hidden: int, inter: int, num_experts: int, top_k: int, reps: int,
             gen: torch.Generator) -> dict:
    x = (torch.randn(rows, hidden, generator=gen) * 0.5).bfloat16()  # [S, H]
    out = torch.empty_like(x)
    times, distinct = [], []
    for r in range(reps + 1):
        ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(rows)])  # [S, k]
        w = torch.softmax(torch.randn(rows, top_k, generator=gen), -1).float().contiguous()  # [S, k]
        t0 = time.process_time()
        lib.moe_decode_batch(WEIGHT_KINDS["bf16"], x.data_ptr(), rows, hidden, inter, 0, num_experts, top_k,
                             ids.data_ptr(), w.data_ptr(), *tables, out.data_ptr())
        dt = time.process_time() - t0
        if r:  # the first call warms the library and the allocator
            times.append(dt)
            distinct.append(len(ids.unique()))
    ms = statistics.median(times) * 1e3
    n_distinct = statistics.mean(distinct)
    expert_bytes = 3 * hidden * inter * 2
    flops = 2 * rows * top_k * 3 * hidden * inter
    return {"rows": rows, "best_ms": min(times) * 1e3, "median_ms": ms, "distinct_experts": n_distinct,
            "gb_per_s": n_distinct * expert_bytes / (ms * 1e-3) / 1e9, "gflop_per_s": flops / (ms * 1e-3) / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = native_lib()
    if lib is None:
        sys.exit("the native kernel library is unavailable on this machine (needs AVX-512 BF16 and a C compiler)")
    gen = torch.Generator().manual_seed(0)
    h, i = args.hidden, args.inter
    experts = [((torch.randn(2 * i, h, generator=gen) * 0.02).bfloat16(),  # fused gate/up [2I, H]
                (torch.randn(h, i, generator=gen) * 0.02).bfloat16())  # down [H, I]
               for _ in range(args.experts)]
    tables = _tables(experts)
    results = []
    print(f"{'case':<30} {'rows':>5} {'experts':>8} {'best ms':>8} {'median ms':>10} {'GB/s':>6} {'GFLOP/s':>8}")
    for name, rows in CASES:
        r = run_case(lib, tables, rows, h, i, args.experts, args.top_k, args.reps, gen)
        results.append({"case": name, **r})
        print(f"{name:<30} {rows:>5} {r['distinct_experts']:>8.1f} {r['best_ms']:>8.2f} {r['median_ms']:>10.2f} "
              f"{r['gb_per_s']:>6.1f} {r['gflop_per_s']:>8.0f}")
    if args.json:
        facts = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": args.threads,
                 "torch": torch.__version__, "load_average": os.getloadavg()}
        args.json.write_text(json.dumps({"facts": facts, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
