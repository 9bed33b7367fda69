"""Synthetic HF checkpoints with real shapes and random bf16 weights, for benchmarks (cached under .cache/)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from strata.config import ModelConfig
from strata.models.registry import config_from_dict, model_class

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "bench"

PRESETS = {
    # TinyLlama-1.1B dims (the llama.cpp / transformers peer numbers in machine.md use these)
    "dense-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
        "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    },
    # OLMoE-1B-7B shapes: 16 layers, 64 experts, top-8, expert FFN 1024
    "olmoe-1b-7b": {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048,
        "intermediate_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 50279, "clip_qkv": None,
    },
}
# A small Mixtral with long positions: prompts of thousands of tokens under a memory budget (benchmarks/budget_rss.py)
PRESETS["mixtral-small"] = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 512,
    "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4,
    "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "torch_dtype": "bfloat16", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}
# Thin twins: the same layers, heads per KV head, experts and vocabulary with widths cut to 256, so a decode step's
# weights are ~50 MB and its time is the engine's fixed cost per step (benchmarks/step_overhead.py)
PRESETS["dense-1b-thin"] = dict(PRESETS["dense-1b"], hidden_size=256, intermediate_size=704, num_attention_heads=4,
                                num_key_value_heads=1)
PRESETS["olmoe-1b-7b-thin"] = dict(PRESETS["olmoe-1b-7b"], hidden_size=256, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=4)


def synthetic_model(name: str, layers: int | None = None) -> Path:
    """Writes (once) config.json + sharded model.safetensors with N(0, 0.02) bf16 weights; returns the folder."""
    cfg_dict = dict(PRESETS[name])
    if layers:
        cfg_dict["num_hidden_layers"] = layers
        name = f"{name}-{layers}l"
    out = CACHE / name
    if (out / "model.safetensors.index.json").exists():
        return out
    tmp = CACHE / f".{name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = config_from_dict(cfg_dict)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in model_class(cfg)(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, idx = {}, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, idx
        fn = f"model-{idx:05d}.safetensors"
        save_file(shard, str(tmp / fn))
        weight_map.update({k: fn for k in shard})
        shard, shard_bytes, idx = {}, 0, idx + 1

    for k, shape in tqdm(shapes.items(), desc=f"writing {name}", unit="tensor"):
        if k.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        shard[k] = t
        shard_bytes += t.numel() * 2
        if shard_bytes > 1 << 30:
            flush()
    if shard:
        flush()
    (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    os.replace(tmp, out)
    return out


def weight_bytes_per_token(cfg: ModelConfig, bytes_per_param: float = 2.0) -> float:
    """Bytes of weights a decode step reads: every active linear + lm_head (embedding: one row, ignored)."""
    counts = cfg.param_counts()
    return (counts["active"] - cfg.vocab_size * cfg.hidden_size) * bytes_per_param


def memory_bandwidth_gbs(size_mib: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth: fp32 sum over a buffer far larger than the cache, best of `repeats`."""
    import time

    x = torch.ones(size_mib * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def machine_rates(threads: int) -> dict:
    """Memory read bandwidth (`memory_bandwidth_gbs`) and Strata's bf16 decode GEMV rate over 384 MiB of weights
    (`strata probe`'s figure), both at the engines' thread count: one core's GEMV does not reach one core's share
    of the bandwidth on every machine."""
    from strata.analysis.probe import strata_bf16_gemv_gbs

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {"memory": memory_bandwidth_gbs(), "gemv_bf16": strata_bf16_gemv_gbs(4096, 4096, 12)}  # 12 x 32 MiB
    finally:
        torch.set_num_threads(old)
