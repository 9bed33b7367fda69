"""KVCacheSpec: bytes per token and allocation for the standard K/V cache and a latent (K only) cache."""

import torch

from strata.config import ModelConfig
from strata.layers.kv_cache import KVCacheSpec, allocate_kv_caches, kv_bytes_per_token
from strata.models.base import CausalLM
from strata.models.registry import config_from_dict


def _cfg(**extra) -> ModelConfig:
    return config_from_dict({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 32,
                                  "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, **extra})


def test_standard_spec_is_key_and_value_per_kv_head():
    cfg = _cfg()
    specs = CausalLM.kv_cache_spec_for(cfg)
    assert len(specs) == 4
    assert kv_bytes_per_token(specs, torch.bfloat16) == 2 * 4 * 2 * 16 * 2
    k, v = specs[0].allocate(10, torch.float32)
    assert k.shape == v.shape == (10, 2, 16) and k.dtype == torch.float32


def test_sliding_window_layers_marked():
    cfg = _cfg(sliding_window=8, use_sliding_window=True, max_window_layers=2)
    assert [s.sliding_window for s in CausalLM.kv_cache_spec_for(cfg)] == [
        8 if cfg.uses_sliding_window(i) else None for i in range(4)]
    assert {s.sliding_window for s in CausalLM.kv_cache_spec_for(cfg)} == {None, 8}


def test_latent_spec_has_no_value_tensor():
    spec = KVCacheSpec(k_heads=1, k_dim=48)
    assert spec.bytes_per_token(torch.bfloat16) == 96
    caches = allocate_kv_caches([spec] * 3, 5, torch.bfloat16)
    assert [tuple(t.shape for t in c) for c in caches] == [((5, 1, 48),)] * 3


def test_spec_dtype_overrides_model_dtype():
    spec = KVCacheSpec.standard(2, 8)
    fp32 = KVCacheSpec(2, 8, 2, 8, dtype=torch.float32)
    assert fp32.bytes_per_token(torch.bfloat16) == 2 * spec.bytes_per_token(torch.bfloat16)
