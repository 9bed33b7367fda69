"""Disk bytes per token of quantized experts under one expert-cache size: bf16 against int8 and int4-g64.

    .venv/bin/python benchmarks/tiers_quant.py [--cache-experts 8,32] [--out docs/benchmarks/tiers_quant.json]

A random Qwen3-MoE (4 MoE layers x 32 experts of [128 -> 128 -> 128], top-2; transformers builds it, a test
dependency) is saved in bf16 and quantized by `strata quantize --method rtn`. Each format then decodes the
same three prompts together for 64 greedy tokens with an expert cache of the same bytes: `--cache-experts`
bf16 experts' worth. The planner's runtime-RSS probe is pinned to 0 and its fixed part computed per
format, so only the expert cache differs between runs. Prints a table (docs/tiers.md) and writes JSON.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMATS = ("bf16", "int8", "int4-g64")
PROMPTS = [[1, 5, 9, 33, 70, 4, 18], [1, 200, 3, 77], [1, 42, 150, 8, 9]]


def build(folder: Path) -> dict[str, str]:
    import torch
    import transformers

    from strata.cli import main
    from tests.models.conftest import COMMON, save_tiny_tokenizer

    src = folder / "bf16"
    cfg = transformers.Qwen3MoeConfig(**{**COMMON, "hidden_size": 128, "num_hidden_layers": 4, "num_experts": 32,
                                         "num_experts_per_tok": 2, "moe_intermediate_size": 128, "head_dim": 32,
                                         "norm_topk_prob": True, "decoder_sparse_step": 1})
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(src)
    save_tiny_tokenizer(src)
    paths = {"bf16": str(src)}
    for fmt in FORMATS[1:]:
        main(["quantize", "--format", fmt, "--method", "rtn", "--no-progress", str(src), str(folder / fmt)])
        paths[fmt] = str(folder / fmt)
    return paths


def run(path: str, cache_bytes: int, max_tokens: int) -> dict:
    import torch

    from strata import LLM
    from strata.config import EngineConfig
    from strata.engine.sampling_params import SamplingParams
    from strata.models.registry import load_config
    from strata.tiers import runtime
    from strata.tiers.pools import TierStats
    from strata.tiers.store_convert import checkpoint_facts

    facts, cfg = checkpoint_facts(path), load_config(path)
    fixed = runtime._plan(path, EngineConfig(memory_budget=1 << 40), cfg, torch.bfloat16, facts).fixed_bytes
    llm = LLM(path, progress=False, memory_budget=fixed + cache_bytes)
    llm.generate([[1, 2]], SamplingParams(max_tokens=1))  # warm-up (kernels), then fresh counters
    llm.engine.tiers.cache.pools.stats = TierStats()
    t0 = time.perf_counter()
    out = llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in out)
    st = llm.engine.tier_stats()
    llm.engine.tiers.close()
    return {"expert_bytes": facts.slot_bytes, "slots": st["expert_cache_slots"],
            "hit_rate": st["expert_hit_rate"], "disk_bytes_per_token": st["disk_bytes_read"] / n,
            "tokens_per_s": n / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-experts", default="8,32", help="expert-cache sizes, in bf16 experts")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", help="write the results here as JSON")
    args = ap.parse_args()
    import os

    import torch

    from strata.fileio import write_json_atomic
    from strata.tiers import runtime

    torch.set_num_threads(1)
    runtime.current_rss = lambda: 0  # exact slot counts: the plan's fixed part is computed per format
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["STRATA_CACHE_DIR"] = str(Path(tmp) / "stores")
        paths = build(Path(tmp))
        from strata.tiers.store_convert import checkpoint_facts

        bf16_expert = checkpoint_facts(paths["bf16"]).slot_bytes
        print("| expert cache | format | expert | slots | hit rate | KiB read / token | tokens/s |")
        print("|---|---|---|---|---|---|---|")
        for n in (int(x) for x in args.cache_experts.split(",")):
            for fmt in FORMATS:
                r = {"cache_bf16_experts": n, "format": fmt, **run(paths[fmt], n * bf16_expert, args.max_tokens)}
                results.append(r)
                print(f"| {n} bf16 experts | {fmt} | {r['expert_bytes'] // 1024} KiB | {r['slots']} | "
                      f"{r['hit_rate']:.3f} | {r['disk_bytes_per_token'] / 1024:.1f} | {r['tokens_per_s']:.0f} |")
    if args.out:
        write_json_atomic(args.out, {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                 "torch_threads": 1}, "results": results})


if __name__ == "__main__":
    main()
