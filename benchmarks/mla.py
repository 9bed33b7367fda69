"""Benchmark: multi-head latent attention (DeepSeek-V2/V3) in Strata.

1. KV-cache bytes per token, and the longest context that fits --kv-memory, for the DeepSeek presets
   (strata/analysis/presets.json): the latent cache Strata keeps (one [kv_lora_rank + qk_rope_head_dim]
   row per layer, DeepseekV2ForCausalLM.kv_cache_spec_for) against the same model with an uncompressed
   cache (each head's key [qk_nope + qk_rope] and value [v_head_dim]). From the configs: no weights needed.
2. Decode and prefill tokens/s, Strata against transformers, on one tiny-but-not-trivial random DeepSeek-V3
   checkpoint (bf16, batch 1), each engine in its own subprocess (benchmarks/core.py's runners).

    .venv/bin/python benchmarks/mla.py
    .venv/bin/python benchmarks/mla.py --kv-memory 8GiB --rounds 3 --threads 2

Writes docs/benchmarks/mla.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.child import run_child
from strata.fileio import write_json_atomic

PRESET_NAMES = ("deepseek-v2-lite", "deepseek-v2", "deepseek-v3")
# the decode-speed model: DeepSeek-V3's structure (q_lora, sigmoid group routing, shared expert, dense first
# layer) at a size a laptop decodes in seconds; about 60M parameters
BENCH_CONFIG = {"vocab_size": 16000, "hidden_size": 512, "intermediate_size": 1024, "moe_intermediate_size": 256,
                "num_hidden_layers": 6, "num_attention_heads": 8, "q_lora_rank": 192, "kv_lora_rank": 128,
                "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64, "n_routed_experts": 16,
                "num_experts_per_tok": 4, "n_shared_experts": 1, "n_group": 4, "topk_group": 2,
                "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "max_position_embeddings": 4096,
                "bos_token_id": 1, "eos_token_id": 2}
CACHE = Path(os.environ.get("STRATA_CACHE_DIR", Path.home() / ".cache" / "strata")) / "bench-mla"


def kv_rows(kv_memory: int) -> list[dict]:
    import torch

    from strata.analysis.shapes import load_presets
    from strata.layers.kv_cache import KVCacheSpec, kv_bytes_per_token
    from strata.models.registry import config_from_dict, model_class

    presets = load_presets()
    rows = []
    for name in PRESET_NAMES:
        cfg = config_from_dict(presets[name]["config"], source=f"presets.json:{name}")
        latent = kv_bytes_per_token(model_class(cfg).kv_cache_spec_for(cfg), torch.bfloat16)
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        full_spec = KVCacheSpec(cfg.num_attention_heads, qk, cfg.num_attention_heads, cfg.v_head_dim)
        full = kv_bytes_per_token([full_spec] * cfg.num_hidden_layers, torch.bfloat16)
        rows.append({"model": name, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
                     "mla_bytes_per_token": latent, "uncompressed_bytes_per_token": full, "ratio": full / latent,
                     "mla_max_tokens": kv_memory // latent, "uncompressed_max_tokens": kv_memory // full})
    return rows


def bench_checkpoint() -> str:
    """Writes (once) the random bf16 DeepSeek-V3 checkpoint of BENCH_CONFIG with transformers."""
    out = CACHE / "deepseek-v3-small"
    if (out / "model.safetensors").exists():
        return str(out)
    import torch
    import transformers

    cfg = transformers.DeepseekV3Config(**BENCH_CONFIG)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).eval()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    os.replace(tmp, out)
    return str(out)


def main() -> None:
    from strata.units import format_size, parse_size

    ap = argparse.ArgumentParser()
    ap.add_argument("--kv-memory", default="4GiB", help="KV-cache memory for the longest-context column")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="repeat the speed runs; medians are reported")
    ap.add_argument("--engines", default="strata,transformers")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "mla.json"))
    args = ap.parse_args()
    import torch

    kv_memory = parse_size(args.kv_memory)
    kv = kv_rows(kv_memory)
    path = bench_checkpoint()
    engines = args.engines.split(",")
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for rnd in range(args.rounds):
        for e in engines:
            runs[e].append(run_child("benchmarks.core", f"run_{e}", path, args.prompt_len, args.decode, args.threads))
            print(rnd, e, runs[e][-1], file=sys.stderr)
    speed = {}
    for e in engines:
        ok = [r for r in runs[e] if "error" not in r]
        speed[e] = ({k: statistics.median(r[k] for r in ok) for k in ("prefill_tok_s", "decode_tok_s")}
                    if ok else runs[e][0])
        speed[e]["rounds"] = runs[e]
    ratios = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(runs.get("strata", []), runs.get("transformers", []))
              if "error" not in a and "error" not in b]
    machine = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "rounds": args.rounds,
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "load_avg": os.getloadavg()}
    write_json_atomic(args.out, {"machine": machine, "kv_memory": kv_memory, "kv": kv, "speed_model": BENCH_CONFIG,
                                 "prompt_len": args.prompt_len, "decode": args.decode, "speed": speed,
                                 "decode_ratio_rounds": ratios})
    print(f"\nKV cache per token (bf16) and longest context in {format_size(kv_memory)}\n")
    print("| model | MLA latent cache | uncompressed K/V | ratio | context (MLA) | context (uncompressed) |")
    print("|---|---|---|---|---|---|")
    for r in kv:
        print(f"| {r['model']} | {format_size(r['mla_bytes_per_token'])} | "
              f"{format_size(r['uncompressed_bytes_per_token'])} | {r['ratio']:.1f}x | {r['mla_max_tokens']:,} | "
              f"{r['uncompressed_max_tokens']:,} |")
    print(f"\nDecode, batch 1, bf16, prompt {args.prompt_len}, {args.decode} tokens, {args.threads} threads, "
          f"load avg {machine['load_avg'][0]:.1f}, medians of {args.rounds} rounds\n")
    print("| engine | prefill tok/s | decode tok/s | decode vs transformers (per round) |")
    print("|---|---|---|---|")
    for e in engines:
        m = speed[e]
        if "error" in m:
            print(f"| {e} | error: {m['error']} | | |")
            continue
        ratio = ""
        if e == "strata" and ratios:
            ratio = f"**{statistics.median(ratios):.2f}x** ({', '.join(f'{x:.2f}' for x in ratios)})"
        print(f"| {e} | {m['prefill_tok_s']:.1f} | {m['decode_tok_s']:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
