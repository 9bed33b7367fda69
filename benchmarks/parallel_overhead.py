"""What tensor and expert parallel cost on one machine: the same model as 1 rank x 2 threads, 1 rank x 1
thread, 2 ranks x 1 thread tensor parallel and 2 ranks x 1 thread expert parallel, side by side in one run.

On one machine the ranks share its cores and memory bandwidth, so parallel cannot be faster than one process
with the same threads; the table measures the price of the split (the all-reduces through gloo, the step
broadcast, the per-rank Python) and checks that every configuration gives the same greedy tokens. Reports
decode ms per token for one stream and for a batch, prefill tokens/s, and the ratios to 1 rank x 2 threads.

    .venv/bin/python benchmarks/parallel_overhead.py --json docs/benchmarks/parallel_overhead.json
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
sys.path.insert(0, str(ROOT))

CONFIGS = {  # name -> engine knobs
    "1 rank x 2 threads": {"num_threads": 2},
    "1 rank x 1 thread": {"num_threads": 1},
    "TP 2 ranks x 1 thread": {"num_threads": 1, "tensor_parallel_size": 2},
    "EP 2 ranks x 1 thread": {"num_threads": 1, "tensor_parallel_size": 2, "enable_expert_parallel": True},
}


def run(model: str | None, knobs: dict, tokens: int, batch: int, prompt_len: int, rounds: int) -> dict:
    from strata import LLM, SamplingParams
    from strata.distributed.launcher import shutdown

    llm = LLM(model, progress=False, dtype="float32", **knobs)
    try:
        vocab = llm.engine.model_config.vocab_size
        prompts = [[(17 * i + 31 * j) % (vocab - 3) + 3 for j in range(prompt_len)] for i in range(batch)]
        greedy = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        llm.generate(prompts[:1], greedy)  # warm-up
        best: dict = {}
        for _ in range(rounds):
            t0 = time.perf_counter()
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1))
            prefill = batch * prompt_len / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            one = llm.generate(prompts[:1], greedy)
            single = (time.perf_counter() - t0) / tokens
            t0 = time.perf_counter()
            many = llm.generate(prompts, greedy)
            batched = (time.perf_counter() - t0) / tokens
            best = {"prefill_tok_s": max(prefill, best.get("prefill_tok_s", 0)),
                    "decode_ms_1": min(single * 1e3, best.get("decode_ms_1", 1e9)),
                    f"decode_ms_{batch}": min(batched * 1e3, best.get(f"decode_ms_{batch}", 1e9))}
        best["tokens"] = [o.outputs[0].token_ids for o in one + many]
        return best
    finally:
        shutdown(llm.engine.model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled MoE)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = {name: run(args.model, knobs, args.tokens, args.batch, args.prompt_len, args.rounds)
            for name, knobs in CONFIGS.items()}
    base = rows["1 rank x 2 threads"]
    same = all(r["tokens"] == base["tokens"] for r in rows.values())
    b = args.batch
    print(f"| configuration | decode ms/token, 1 stream | decode ms/step, {b} streams | prefill tok/s | "
          f"1-stream time vs 1x2 | {b}-stream time vs 1x2 | prefill rate vs 1x2 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['decode_ms_1']:.2f} | {r[f'decode_ms_{b}']:.2f} | {r['prefill_tok_s']:.0f} | "
              f"{r['decode_ms_1'] / base['decode_ms_1']:.2f} | {r[f'decode_ms_{b}'] / base[f'decode_ms_{b}']:.2f} | "
              f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f} |")
    print(f"greedy tokens identical in every configuration: {same}")
    if args.json:
        facts = {"machine": platform.machine(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
                 "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
        out = {"facts": facts, "identical_tokens": same,
               "rows": {k: {m: v for m, v in r.items() if m != "tokens"} for k, r in rows.items()}}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
