"""The engine's decode step alone (no server): its time per step at 1 and at 16 sequences, for several checkouts
side by side, and the bf16 kernels the one-call decode chooses between for small weights.

Steps: `LLMEngine.step()` on the bundled model (or --model), 1 thread (or --threads; NAME=DIR@THREADS gives a
configuration its own), greedy, 128 tokens per sequence; the median
step after each batch's prompt step. Each configuration runs in a fresh interpreter with its checkout first on
PYTHONPATH, the configurations taking turns round by round (this machine's speed drifts by up to 1.5x within
minutes: a round compares runs seconds apart); per configuration the median of its rounds' medians, and per
round each configuration's time over the first one's. Kernels (this checkout): gemv_bf16 against the GEMM
(gemm_dq) on bf16 weights that stay in cache, per shape and row count (median of repeated timeit runs).
Results: docs/benchmarks.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decode_step.py before=../strata-before after=. --rounds 5 \\
        --json docs/benchmarks/decode_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQS = (1, 16)


def child(model: str | None, tokens: int, threads: int = 1, dtype: str = "auto") -> dict:
    """(in a fresh interpreter) median decode step seconds per batch size."""
    import torch

    from strata.config import EngineConfig
    from strata.engine.llm_engine import LLMEngine
    from strata.engine.sampling_params import SamplingParams

    torch.set_num_threads(threads)
    cfg = EngineConfig(model=model, num_threads=threads, max_num_seqs=max(SEQS), dtype=dtype)
    eng = LLMEngine(cfg, progress=False)
    eng.defer_detokenization()  # as the server runs it
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    out = {}
    for warm in (True, False):
        for n in SEQS:
            for _ in range(n):
                eng.add_request("ROMEO:", params)
            eng.step()  # the prompts
            times = []
            while eng.has_unfinished_requests():
                t = time.perf_counter()
                eng.step()
                times.append(time.perf_counter() - t)
            if not warm:
                out[str(n)] = statistics.median(times)
    return out


def kernels(reps: int) -> list[dict]:
    """gemv_bf16 against gemm_dq on cached bf16 weights [N, K] at M rows: microseconds per call."""
    import timeit

    import torch

    from strata.layers.linear import bf16_lib

    lib = bf16_lib()
    rows = []
    for n, k in [(2048, 160), (512, 160), (256, 160), (576, 576), (2048, 256)]:
        w = torch.randn(n, k).bfloat16()
        for m in (1, 8, 12, 16, 24):
            x = torch.randn(m, k).bfloat16()
            y = torch.empty(m, n, dtype=torch.bfloat16)
            args = (x.data_ptr(), m, k, w.data_ptr(), n)
            gemv = min(timeit.repeat(lambda a=args, y=y: lib.gemv_bf16(*a, None, y.data_ptr(), 0),
                                     number=reps, repeat=5)) / reps
            gemm = min(timeit.repeat(lambda a=args, y=y: lib.gemm_dq(0, *a[:4], None, None, a[4], 0, None, y.data_ptr()),
                                     number=reps, repeat=5)) / reps
            rows.append({"n": n, "k": k, "kib": n * k * 2 / 1024, "m": m, "gemv_us": gemv * 1e6,
                         "gemm_us": gemm * 1e6, "gemm_over_gemv": gemm / gemv})
    return rows


def _run_child(code: str, model: str | None, tokens: int, threads: int = 1, dtype: str = "auto") -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(code).resolve()), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--tokens", str(tokens), "--threads", str(threads),
           "--dtype", dtype, *(["--model", model] if model else [])]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{code}: the step run failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="*", metavar="NAME=DIR[@THREADS]",
                    help="checkouts to compare, each with its own threads after @ (default: this one, --threads)")
    ap.add_argument("--model", default=None, help="HF folder or GGUF (default: the bundled model)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="threads of the engine steps (the kernels: 1)")
    ap.add_argument("--dtype", default="auto", help="compute dtype (--dtype of the engine)")
    ap.add_argument("--reps", type=int, default=2000, help="kernel calls per timing")
    ap.add_argument("--no-kernels", action="store_true", help="the steps only")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.tokens, args.threads, args.dtype)))
        return
    configs = [c.split("=", 1) for c in args.configs] or [["this", "."]]
    threads = {name: int(code.partition("@")[2] or args.threads) for name, code in configs}
    configs = [[name, code.partition("@")[0]] for name, code in configs]
    for name, code in configs:  # a missing checkout would import this one's strata through the editable install
        if not (Path(code) / "strata" / "__init__.py").is_file():
            raise SystemExit(f"configuration {name}: {code} holds no strata package")
    runs = {name: [] for name, _ in configs}
    for _ in range(args.rounds):
        for name, code in configs:
            runs[name].append(_run_child(code, args.model, args.tokens, threads[name], args.dtype))
    first = configs[0][0]
    out = {}
    print("| configuration | " + " | ".join(f"{n} seq step ms" for n in SEQS) + " | "
          + " | ".join(f"{n} seq / {first} (rounds)" for n in SEQS) + " |")
    print("|---" * (1 + 2 * len(SEQS)) + "|")
    for name, _ in configs:
        med = {n: statistics.median(r[str(n)] for r in runs[name]) for n in SEQS}
        ratios = {n: [r[str(n)] / b[str(n)] for r, b in zip(runs[name], runs[first])] for n in SEQS}
        out[name] = {"step_ms": {str(n): med[n] * 1e3 for n in SEQS},
                     "per_token_ms": {str(n): med[n] * 1e3 / n for n in SEQS},
                     "ratio_to_first_median": {str(n): statistics.median(ratios[n]) for n in SEQS},
                     "rounds_ms": [{k: v * 1e3 for k, v in r.items()} for r in runs[name]]}
        print(f"| {name} | " + " | ".join(f"{med[n] * 1e3:.3f}" for n in SEQS) + " | "
              + " | ".join(f"{statistics.median(ratios[n]):.2f}x" for n in SEQS) + " |")
    krows = [] if args.no_kernels else kernels(args.reps)
    if krows:
        print("\n| weight N x K (KiB) | rows | gemv_bf16 us | GEMM us | GEMM / gemv |\n|---|---|---|---|---|")
    for r in krows:
        print(f"| {r['n']} x {r['k']} ({r['kib']:.0f}) | {r['m']} | {r['gemv_us']:.2f} | {r['gemm_us']:.2f} | "
              f"{r['gemm_over_gemv']:.2f}x |")
    if args.json:
        sys.path.insert(0, str(ROOT))
        from strata.fileio import write_json_atomic

        write_json_atomic(args.json, {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                  "load_avg": os.getloadavg()},
                                      "args": vars(args), "steps": out, "kernels": krows})


if __name__ == "__main__":
    main()
