"""The sampler's per-step work on [N, V] rows, native code against torch, interleaved, on the vocabularies of the
bundled model (2,048) and SmolLM2 (49,152):

- draw: one token per row from sampling weights. The engine's inverse-CDF draw (strata/engine/sampler.py `draw`:
  one uniform per row, float64 block sums) in native code (cpu_sample.c) and as torch operations, and
  torch.multinomial's way (an Exp(1) noise vector per row, argmax(probs / noise)).
- temperature 0.8 alone (`batch_sampling_probs`): the native division and softmax in one call against torch's
  division and softmax.
- top-p 0.95 and top-k 50 (`batch_sampling_probs`, temperature 0.8 included): the native radix select (and
  softmax) against torch's sort / topk (and softmax).

    .venv/bin/python benchmarks/sampler_draw.py --threads 1 --json docs/benchmarks/sampler_draw.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from strata.engine import sampler
from strata.engine.sampler import batch_sampling_probs, draw
from strata.engine.sampling_params import SamplingParams
from strata.engine.sequence import Sequence
from strata.fileio import write_json_atomic


def exponential_noise(probs: torch.Tensor) -> torch.Tensor:
    """probs [N, V] -> [N]: what torch.multinomial(probs, 1) computes per row."""
    return torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1)


@contextmanager
def torch_only():
    """The sampler without its native kernels (its torch fallback)."""
    saved = sampler.native_lib
    sampler.native_lib = lambda: None
    try:
        yield
    finally:
        sampler.native_lib = saved


def best_us(fn, reps: int, native: bool = True) -> float:
    def call():
        if native:
            return fn()
        with torch_only():
            return fn()
    call()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return min(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--vocab", type=int, nargs="+", default=[2048, 49152])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = {
        "draw": lambda lg, pr, sq: draw(pr, sq),
        "softmax": lambda lg, pr, sq: batch_sampling_probs(lg, [SamplingParams(temperature=0.8)] * len(sq)),
        "top_p": lambda lg, pr, sq: batch_sampling_probs(lg, [SamplingParams(temperature=0.8, top_p=0.95)] * len(sq)),
        "top_k": lambda lg, pr, sq: batch_sampling_probs(lg, [SamplingParams(temperature=0.8, top_k=50)] * len(sq)),
    }
    out = []
    print("| step | rows | vocab | native us | torch us | torch / native | Exp(1) noise us |\n|---|---|---|---|---|---|---|")
    for name, fn in cases.items():
        for vocab in args.vocab:
            for n in args.rows:
                logits = torch.randn(n, vocab) * 3  # [N, V]
                probs = torch.softmax(logits, dim=-1)  # [N, V]
                seqs = [Sequence("r", [0], SamplingParams(), index=0)] * n
                native, plain, noise = [], [], []
                for _ in range(args.rounds):  # alternated, so a change of load hits all alike
                    call = lambda f=fn, lg=logits, pr=probs, sq=seqs: f(lg, pr, sq)
                    native.append(best_us(call, args.reps))
                    plain.append(best_us(call, args.reps, native=False))
                    if name == "draw":
                        noise.append(best_us(lambda p=probs: exponential_noise(p), args.reps))
                row = {"step": name, "rows": n, "vocab": vocab, "native_us": min(native), "torch_us": min(plain),
                       "exponential_noise_us": min(noise) if noise else None}
                row["ratio"] = row["torch_us"] / row["native_us"]
                out.append(row)
                extra = f"{row['exponential_noise_us']:.1f}" if noise else "-"
                print(f"| {name} | {n} | {vocab} | {row['native_us']:.1f} | {row['torch_us']:.1f} | "
                      f"{row['ratio']:.1f}x | {extra} |", flush=True)
    if args.json:
        meta = {"threads": args.threads, "cpu": platform.processor() or platform.machine(),
                "load_average": os.getloadavg()[0], "torch": torch.__version__}
        write_json_atomic(args.json, {"meta": meta, "rows": out}, indent=1)


if __name__ == "__main__":
    main()
