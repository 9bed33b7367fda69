"""Speculative verification cost: the time of one target forward of 1 + k rows (one sequence), against k.

    .venv/bin/python benchmarks/spec_verify.py --model SMOLLM2.gguf --model strata/assets/models/shakespeare-moe

For each model (bf16) the forward runs after a prefill of --context tokens, at k = 0 (a plain decode step)
to --max-k, on two paths: "native", the one-call decoder with per-row sequences (models/native_decode.py;
gemv_bf16 reads each weight once per 8 rows), and "per-op", the layer-by-layer path with the projections'
GEMV limited to 4 rows (what a verification ran before the native verify). The drafted tokens are the
prompt's own; no token is kept (the KV slots are written and released). Every time is the fastest of
--repeats, the paths and k interleaved so load bursts on a shared machine hit them alike. Writes
docs/benchmarks/spec_verify.json and prints a markdown table (time and time relative to k = 0 native).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from strata.fileio import write_json_atomic


def verify_times(path: str, context: int, max_k: int, repeats: int, threads: int) -> dict:
    """{path name: [seconds of the forward with k drafted rows for k in 0..max_k]}."""
    import torch

    from strata import LLM, SamplingParams
    from strata.engine.scheduler import ScheduledBatch
    from strata.layers import linear as linear_mod

    llm = LLM(path, progress=False, dtype="bfloat16", max_num_seqs=1, num_threads=threads)
    eng = llm.engine
    vocab = eng.model_config.vocab_size
    prompt = torch.randint(3, min(vocab, 30000), (context,), generator=torch.Generator().manual_seed(0)).tolist()
    eng.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=2 * max_k + 2, ignore_eos=True))
    eng.step()  # prefill
    seq, bm, model = eng.scheduler.running[0], eng.block_manager, eng.model
    paths = {"native": (True, linear_mod.MAX_ROWS), "per-op": (False, 4)}
    best = {name: [float("inf")] * (max_k + 1) for name in paths}
    for _ in range(repeats):
        for name, (native, rows) in paths.items():
            model.use_native_decoder, linear_mod.MAX_ROWS = native, rows
            for k in range(max_k + 1):
                n = seq.num_tokens
                assert bm.reserve(seq, n + k)
                seq.token_ids.extend(prompt[:k])
                t0 = time.perf_counter()
                eng.runner.execute(ScheduledBatch([seq], [k + 1]), [k + 1])
                best[name][k] = min(best[name][k], time.perf_counter() - t0)
                del seq.token_ids[n:]
                bm.release_tail(seq, n)
    model.use_native_decoder, linear_mod.MAX_ROWS = True, paths["native"][1]
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="model folder or GGUF file (repeatable)")
    ap.add_argument("--context", type=int, default=256, help="tokens in the KV cache before the verification")
    ap.add_argument("--max-k", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "spec_verify.json"))
    args = ap.parse_args()
    from benchmarks.child import run_child

    load0 = os.getloadavg()
    rows = []
    for path in args.model:
        r = run_child("benchmarks.spec_verify", "verify_times", path, args.context, args.max_k, args.repeats,
                      args.threads, timeout=1800)
        rows.append({"model": os.path.basename(path.rstrip("/")), **r})
    machine = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
               "load_avg_start": load0, "load_avg_end": os.getloadavg()}
    write_json_atomic(args.out, {"machine": machine, "context": args.context, "repeats": args.repeats, "rows": rows})
    print(f"\nload avg {load0[0]:.1f} -> {os.getloadavg()[0]:.1f}, {args.threads} thread(s), fastest of "
          f"{args.repeats}\n")
    ks = range(args.max_k + 1)
    print("| model | path | " + " | ".join(f"k={k}" for k in ks) + " |")
    print("|---|---|" + "---|" * len(ks))
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | error: {r['error']} |")
            continue
        base = r["native"][0]
        for name in ("native", "per-op"):
            cells = " | ".join(f"{1e3 * t:.1f} ms ({t / base:.2f})" for t in r[name])
            print(f"| {r['model']} | {name} | {cells} |")


if __name__ == "__main__":
    main()
