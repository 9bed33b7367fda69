"""CLI flags generated from EngineConfig's fields (one place for the knobs and their help)."""

from __future__ import annotations

import argparse
import dataclasses

from strata import units
from strata.config import EngineConfig
from strata.errors import ConfigError
from strata.tiers.policies import ONLINE_POLICIES
from strata.tiers.predictors import PREFETCHERS

HELP = {
    "model": "HF model folder or GGUF file (default: the bundled Shakespeare MoE)",
    "tokenizer": "folder with tokenizer.json and tokenizer_config.json (default: the model folder)",
    "seed": "seed for the sampling of requests without a seed of their own (reproducible runs)",
    "dtype": "compute dtype: auto (checkpoint's), float32, bfloat16, float16",
    "max_model_len": "maximum tokens per sequence (default: config's max_position_embeddings, at most 4096)",
    "max_num_seqs": "sequences decoded together",
    "max_num_batched_tokens": "token budget of one engine step (longer prompts are prefilled in chunks)",
    "block_size": "tokens per KV-cache block",
    "kv_cache_memory": "bytes for the KV cache, e.g. 512MiB",
    "enable_prefix_caching": "share KV blocks between prompts with a common prefix",
    "num_threads": "torch CPU threads (default: torch's choice; 1 for models under 20M parameters)",
    "memory_budget": "total memory budget, e.g. 3GiB; MoE experts beyond it are served from disk",
    "expert_cache_policy": f"expert cache eviction policy ({', '.join(ONLINE_POLICIES)})",
    "prefetch": f"expert prefetcher ({', '.join((*PREFETCHERS, 'lookahead'))})",
    "miss_fallback": "on an expert cache miss: none (wait for the read; exact), renormalize (skip the expert, "
                     "rescale the others' weights), lowbit (run a resident int4 copy); see docs/tiers.md",
    "record_routing": "write routing decisions as JSONL to this file",
    "replay_routing": "force routing from this JSONL trace",
    "check_weights": "refuse weights holding NaN or inf at load (--no-check-weights skips the pass)",
    "speculative_config": 'speculative decoding as JSON (vLLM keys): \'{"model": DRAFT, "num_speculative_tokens": 4}\' '
                          'or \'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}\'; '
                          'see docs/speculative.md',
}
_SIZE_FIELDS = {"kv_cache_memory", "memory_budget"}


def parse_size(text: str, field: str = "size") -> int:
    flag = "--" + field.replace("_", "-")
    try:
        value = units.parse_size(text)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None
    if value <= 0:
        raise ConfigError(f"{flag}: must be > 0, got {text!r}")
    return value


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    for f in dataclasses.fields(EngineConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=HELP[f.name])
        elif f.name in _SIZE_FIELDS:
            parser.add_argument(flag, default=None, help=HELP[f.name])
        elif isinstance(default, int) and not isinstance(default, bool) or f.name in ("max_model_len", "num_threads",
                                                                                      "seed"):
            parser.add_argument(flag, type=int, default=default, help=HELP[f.name])
        else:
            parser.add_argument(flag, default=default, help=HELP[f.name])


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    kw = {}
    for f in dataclasses.fields(EngineConfig):
        if not hasattr(args, f.name):
            continue
        v = getattr(args, f.name)
        if f.name in _SIZE_FIELDS and v is not None:
            v = parse_size(v, f.name)
        if v is None and f.name in _SIZE_FIELDS:
            v = f.default
        kw[f.name] = v
    return EngineConfig(**kw)
