"""`strata info`: architecture, parameter counts (total / active per token), experts, memory per precision."""

from __future__ import annotations

import json

from strata.models.registry import load_config
from strata.units import format_size

BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0, "int4-g64": 0.5 + 2 / 64}


def register(sub) -> None:
    p = sub.add_parser("info", help="architecture, parameters, experts and memory needed per precision")
    p.add_argument("--model", default=None, help="HF model folder (default: the bundled model)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def model_info(path: str) -> dict:
    cfg = load_config(path)
    counts = cfg.param_counts()
    info = {
        "architecture": cfg.architecture,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "checkpoint_dtype": cfg.torch_dtype,
        "total_params": counts["total"],
        "active_params": counts["active"],
        "experts": None,
        "memory_bytes": {k: int(counts["total"] * b) for k, b in BYTES_PER_PARAM.items()},
    }
    if cfg.is_moe:
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        info["experts"] = {
            "per_layer": cfg.num_experts,
            "per_token": cfg.num_experts_per_tok,
            "moe_layers": moe_layers,
            "expert_params": cfg.expert_param_count,
            "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size,
            "non_expert_params": counts["non_expert"],
        }
        info["resident_memory_bytes"] = {k: int(counts["non_expert"] * b) for k, b in BYTES_PER_PARAM.items()}
    return info


def _fmt(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}P"


def run(args) -> int:
    from strata.engine.llm_engine import BUNDLED_MODEL

    info = model_info(args.model or BUNDLED_MODEL)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"architecture   {info['architecture']}")
    print(f"shape          {info['layers']} layers, hidden {info['hidden_size']}, heads {info['heads']}/"
          f"{info['kv_heads']} (head_dim {info['head_dim']}), vocab {info['vocab_size']}")
    print(f"parameters     {_fmt(info['total_params'])} total, {_fmt(info['active_params'])} active per token")
    if info["experts"]:
        e = info["experts"]
        print(f"experts        {e['per_layer']} per layer x {e['moe_layers']} MoE layers, top-{e['per_token']}, "
              f"{_fmt(e['expert_params'])} params each; non-expert {_fmt(e['non_expert_params'])}")
    print("memory         " + ", ".join(f"{k} {format_size(v)}" for k, v in info["memory_bytes"].items()))
    if info["experts"]:
        print("resident part  " + ", ".join(f"{k} {format_size(v)}" for k, v in info["resident_memory_bytes"].items()))
    return 0
