"""llama.cpp peer speed on the synthetic benchmark models: prefill and decode tok/s per GGUF type, with the
machine's memory read bandwidth and load average measured in the same run.

    .venv/bin/python benchmarks/peers/measure.py --models dense-1b --types bf16,q8_0,q4_0

Writes docs/benchmarks/peers.json and prints a markdown table. Uses the same prompt ids as benchmarks/core.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.core import _prompt
from benchmarks.peers.llamacpp import bench_llamacpp, gguf_for
from benchmarks.synthetic import memory_bandwidth_gbs, synthetic_model
from strata.fileio import write_json_atomic


def main() -> int:
    import llama_cpp
    import torch

    from strata.models.registry import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="dense-1b")
    ap.add_argument("--types", default="bf16,q8_0,q4_0")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--omp", default="default,passive",
                    help="OpenMP wait policies to run: default (llama.cpp as shipped) and/or passive")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "peers.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    bw = memory_bandwidth_gbs()
    rows = []
    for name in args.models.split(","):
        folder = synthetic_model(name)
        cfg = load_config(str(folder))
        ids = _prompt(cfg.vocab_size, args.prompt_len)
        for qtype in args.types.split(","):
            path = gguf_for(folder, qtype)
            size = path.stat().st_size
            for omp in args.omp.split(","):
                env = {"OMP_WAIT_POLICY": "passive"} if omp == "passive" else None
                r = bench_llamacpp(path, ids, args.decode, args.threads, env=env)
                row = {"model": name, "type": qtype, "omp_wait_policy": omp, "file_bytes": size,
                       "prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"],
                       "file_gb_s_at_decode": size * r["decode_tok_s"] / 1e9, "load_s": r["load_s"],
                       "llama_perf": r["llama_perf"], "load_avg": os.getloadavg()}
                print(name, qtype, omp, {k: row[k] for k in ("prefill_tok_s", "decode_tok_s")}, file=sys.stderr)
                rows.append(row)
    machine = {"threads": args.threads, "memory_read_gb_s": bw, "llama_cpp_python": llama_cpp.__version__,
               "system_info": llama_cpp.llama_print_system_info().decode().strip(),
               "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg_before": load_before,
               "load_avg_after": os.getloadavg(), "prompt_len": args.prompt_len, "decode": args.decode}
    write_json_atomic(args.out, {"machine": machine, "rows": rows})
    print(f"\nmemory read {bw:.1f} GB/s, {args.threads} threads, load avg {load_before[0]:.1f} -> "
          f"{machine['load_avg_after'][0]:.1f}\n")
    print("| model | type | OMP wait | file GB | prefill tok/s | decode tok/s | file GB/s at decode | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['type']} | {r['omp_wait_policy']} | {r['file_bytes'] / 1e9:.2f} | "
              f"{r['prefill_tok_s']:.1f} | "
              f"{r['decode_tok_s']:.2f} | {r['file_gb_s_at_decode']:.1f} | {r['load_avg'][0]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
