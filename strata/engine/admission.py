"""What a request may ask for, checked before it reaches the scheduler (by the engine and the server alike).

max_model_len never exceeds what the KV cache holds, and a request whose prompt plus max_tokens does not fit
is refused (a sequence longer than the whole cache could never be scheduled again after a preemption, and
would block the queue forever); token ids in the request must be in the vocabulary."""

from __future__ import annotations

import logging
import os

from strata.engine.sampling_params import SamplingParams
from strata.errors import ConfigError, InvalidRequestError
from strata.units import format_size

log = logging.getLogger("strata.engine")

DEFAULT_MAX_MODEL_LEN = 4096  # cap of the default (the config's max_position_embeddings)


def resolve_max_model_len(config, mcfg, path: str) -> int:
    """--max-model-len, or the model's positions capped at DEFAULT_MAX_MODEL_LEN; beyond the positions only
    with rope scaling (config: EngineConfig, mcfg: ModelConfig)."""
    if config.max_model_len and config.max_model_len > mcfg.max_position_embeddings and not mcfg.rope_scaling:
        raise ConfigError(f"--max-model-len {config.max_model_len} exceeds the model's max_position_embeddings "
                          f"{mcfg.max_position_embeddings} ({os.path.join(path, 'config.json')}); longer contexts "
                          "need rope_scaling in config.json")
    return config.max_model_len or min(mcfg.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)


def fit_max_model_len(requested: int | None, wanted: int, cache_tokens: int, kv_cache_memory: int) -> int:
    """max_model_len the KV cache can hold: an explicit --max-model-len above it is refused (one line naming
    both numbers); the default is lowered to it with a log line."""
    if wanted <= cache_tokens:
        return wanted
    mem = format_size(kv_cache_memory)
    if requested:
        raise ConfigError(
            f"--max-model-len {requested} is more than the KV cache holds ({cache_tokens} tokens in "
            f"--kv-cache-memory {mem}); lower --max-model-len or raise --kv-cache-memory"
        )
    log.warning("max_model_len lowered from %d to %d: the KV cache (--kv-cache-memory %s) holds %d tokens; "
                "raise --kv-cache-memory for longer sequences", wanted, cache_tokens, mem, cache_tokens)
    return cache_tokens


def check_request_fits(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                       param: str = "prompt") -> None:
    """Refuses a request that cannot finish inside max_model_len (OpenAI's context_length_exceeded wording)."""
    where = "messages" if param == "messages" else "prompt"
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        msg = (f"This model's maximum context length is {max_model_len} tokens. However, you requested "
               f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {where}, {max_tokens} in the "
               f"completion). Please reduce the length of the {where} or completion.")
    elif num_prompt_tokens >= max_model_len:
        msg = (f"This model's maximum context length is {max_model_len} tokens. However, your {where} resulted "
               f"in {num_prompt_tokens} tokens, leaving none for the completion. Please reduce the length of the "
               f"{where}.")
    else:
        return
    raise InvalidRequestError(msg, param=param, code="context_length_exceeded")


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """logit_bias keys and stop_token_ids must name tokens of the vocabulary (a typo would be silently ignored)."""
    for param, ids in (("logit_bias", params.logit_bias or {}), ("stop_token_ids", params.stop_token_ids)):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"{param}: token ids must be in [0, {vocab_size}), got {bad[0]}", param=param)
