"""Expert weight traffic of a batched MoE decode step: the native call groups a step's tokens by expert and
streams each routed expert once, where running the tokens one at a time streams one expert per token-expert
assignment. For 1..N sequences decoding together, reports per step the distinct experts routed (expert runs,
from the native call's counters), the assignments, the expert bytes each way, and the step time.

    .venv/bin/python benchmarks/moe_batch_bytes.py --seqs 1 4 16 --json docs/benchmarks/moe_batch_bytes.json
    .venv/bin/python benchmarks/moe_batch_bytes.py --model .cache/bench/olmoe-1b-7b-2l --seqs 1 16
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def expert_bytes(model) -> int:
    """Bytes of one expert (weights and quantization scales) of the first MoE block."""
    block = model.moe_blocks()[0]
    e = block.experts[0]
    return sum(t.numel() * t.element_size() for t in (*e.parameters(), *e.buffers()))


def measure(model_path: str | None, num_seqs: int, steps: int, threads: int) -> dict:
    from strata.config import EngineConfig
    from strata.engine.llm_engine import LLMEngine
    from strata.engine.sampling_params import SamplingParams
    from strata.layers.moe_native import take_counts

    eng = LLMEngine(EngineConfig(model=model_path, num_threads=threads, max_num_seqs=num_seqs, max_model_len=256,
                                 dtype="bfloat16"), progress=False)
    rng = random.Random(0)
    vocab = eng.model_config.vocab_size
    for _ in range(num_seqs):
        eng.add_request([rng.randrange(vocab) for _ in range(16)],
                        SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True))
    while any(s.num_completion_tokens == 0 for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()  # prefill and the first token of every sequence
    take_counts()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    wall = time.perf_counter() - t0
    counts = take_counts()
    per = expert_bytes(eng.model)
    num_layers = len(eng.model.moe_blocks())
    return {"seqs": num_seqs, "steps": steps, "moe_layers": num_layers, "expert_bytes": per,
            "expert_runs_per_step": counts["expert_runs"] / steps,
            "assignments_per_step": counts["assignments"] / steps,
            "grouped_mib_per_step": counts["expert_runs"] * per / steps / 2**20,
            "per_token_mib_per_step": counts["assignments"] * per / steps / 2**20,
            "step_ms": wall / steps * 1e3, "native_calls_per_step": counts["calls"] / steps}


def main() -> None:
    from benchmarks.child import run_child

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF folder or GGUF (default: the bundled model)")
    ap.add_argument("--seqs", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for n in args.seqs:  # each in a fresh interpreter: one engine at a time
        r = run_child("benchmarks.moe_batch_bytes", "measure", args.model, n, args.steps, args.threads)
        if "error" in r:
            raise SystemExit(f"{n} sequences: {r['error']}")
        rows.append(r)
    print("| sequences | expert runs / step (distinct experts) | token-expert assignments / step | "
          "expert MiB / step, grouped | expert MiB / step, one token at a time | step ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seqs']} | {r['expert_runs_per_step']:.1f} | {r['assignments_per_step']:.1f} | "
              f"{r['grouped_mib_per_step']:.2f} | {r['per_token_mib_per_step']:.2f} | {r['step_ms']:.2f} |")
    if args.json:
        from strata.fileio import write_json_atomic

        write_json_atomic(args.json, {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                  "load_avg": os.getloadavg()}, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
