"""Drawing one token per row from [N, V] sampling weights: the engine's inverse-CDF draw (strata/engine/sampler.py
`draw`: one uniform per row, a float64 cumulative sum) against torch.multinomial's way (an Exp(1) noise vector per
row, argmax(probs / noise)), interleaved, on the vocabularies of the bundled model (2,048) and SmolLM2 (49,152).

    .venv/bin/python benchmarks/sampler_draw.py --threads 1 --json docs/benchmarks/sampler_draw.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from strata.engine.sampler import draw
from strata.engine.sampling_params import SamplingParams
from strata.engine.sequence import Sequence
from strata.fileio import write_json_atomic


def exponential_noise(probs: torch.Tensor) -> torch.Tensor:
    """probs [N, V] -> [N]: what torch.multinomial(probs, 1) computes per row."""
    return torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1)


def best_us(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--vocab", type=int, nargs="+", default=[2048, 49152])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = []
    print("| rows | vocab | inverse CDF us | Exp(1) noise us | noise / inverse CDF |\n|---|---|---|---|---|")
    for vocab in args.vocab:
        for n in args.rows:
            probs = torch.softmax(torch.randn(n, vocab) * 3, dim=-1)  # [N, V]
            seqs = [Sequence("r", [0], SamplingParams(), index=0)] * n
            icdf, noise = [], []
            for _ in range(args.rounds):  # alternated, so a change of load hits both
                icdf.append(best_us(lambda p=probs, s=seqs: draw(p, s), args.reps))
                noise.append(best_us(lambda p=probs: exponential_noise(p), args.reps))
            row = {"rows": n, "vocab": vocab, "inverse_cdf_us": min(icdf), "exponential_noise_us": min(noise)}
            row["ratio"] = row["exponential_noise_us"] / row["inverse_cdf_us"]
            out.append(row)
            print(f"| {n} | {vocab} | {row['inverse_cdf_us']:.1f} | {row['exponential_noise_us']:.1f} | "
                  f"{row['ratio']:.1f}x |", flush=True)
    if args.json:
        meta = {"threads": args.threads, "cpu": platform.processor() or platform.machine(),
                "load_average": os.getloadavg()[0], "torch": torch.__version__}
        write_json_atomic(args.json, {"meta": meta, "rows": out}, indent=1)


if __name__ == "__main__":
    main()
