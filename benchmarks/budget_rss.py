"""Peak RSS against --memory-budget for long prompts and batches of them, each run in a fresh process.

    python -m benchmarks.budget_rss [--budget 400MiB] [--json out.json]

Model: the `mixtral-small` preset of benchmarks/synthetic.py (random bfloat16 weights, 4 layers of 8 experts of
4.5 MiB). Each workload runs greedy with `ignore_eos` and reports the peak RSS (VmHWM), the RSS when it ends, the
plan's activation reserve and step token budget, and the overshoot over the budget (the promise: at most 5%).
"""

from __future__ import annotations

import argparse
import json
import platform

from benchmarks.child import run_child
from benchmarks.synthetic import synthetic_model

# (prompts, prompt tokens, --max-num-batched-tokens, --kv-cache-memory MiB, max tokens)
WORKLOADS = [(1, 1000, 2048, 64, 16), (1, 2000, 512, 64, 16), (16, 1000, 2048, 64, 16), (16, 1000, 8192, 64, 16)]


def run_workload(path: str, budget: str, n: int, length: int, step_tokens: int, kv_mib: int, max_tokens: int) -> dict:
    import torch

    from strata import LLM
    from strata.engine.sampling_params import SamplingParams
    from strata.engine.stats import peak_rss_bytes
    from strata.tiers.budget import current_rss
    from strata.units import parse_size

    llm = LLM(path, progress=False, memory_budget=parse_size(budget), max_num_seqs=n, max_model_len=4096,
              kv_cache_memory=kv_mib << 20, max_num_batched_tokens=step_tokens, num_threads=1)
    loaded = current_rss()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 30000, (length,), generator=g).tolist() for _ in range(n)]
    llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    plan = llm.engine.tiers.plan
    return {"peak_rss_bytes": peak_rss_bytes(), "loaded_rss_bytes": loaded, "end_rss_bytes": current_rss(),
            "activation_bytes": plan.activation_bytes, "expert_slots": plan.num_slots,
            "step_tokens": llm.engine.scheduler.max_num_batched_tokens, "budget_bytes": plan.budget_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="400MiB")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    path = str(synthetic_model("mixtral-small"))
    rows = []
    print(f"{'workload':<34} {'peak MiB':>9} {'end MiB':>8} {'act MiB':>8} {'slots':>5} {'over':>6}")
    for n, length, step, kv, max_tokens in WORKLOADS:
        r = run_child("benchmarks.budget_rss", "run_workload", path, args.budget, n, length, step, kv, max_tokens,
                      env={"OMP_NUM_THREADS": "1"})
        name = f"{n} x {length} tokens, steps of {step}"
        rows.append({"workload": name, **r})
        if "error" in r:
            print(f"{name:<34} error: {r['error']}")
            continue
        mib = 1 << 20
        over = r["peak_rss_bytes"] / r["budget_bytes"] - 1
        print(f"{name:<34} {r['peak_rss_bytes'] / mib:9.0f} {r['end_rss_bytes'] / mib:8.0f} "
              f"{r['activation_bytes'] / mib:8.0f} {r['expert_slots']:5d} {over:+6.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.uname()._asdict(), "budget": args.budget, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
