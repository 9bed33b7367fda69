"""What one decoder layer keeps in the paged KV cache per token: `KVCacheSpec`.

A family says what it caches (`CausalLM.kv_cache_spec_for(cfg)`, one spec per layer); the engine allocates
the cache from it (`allocate`), and the engine, the tiers and the memory budget size the cache from it
(`bytes_per_token`), so nobody computes `2 * layers * kv_heads * head_dim` on their own.

- standard attention: a key and a value per KV head, `k_heads = v_heads = num_key_value_heads`,
  `k_dim = v_dim = head_dim`;
- multi-head latent attention (DeepSeek-V2/V3): one "key" of the compressed latent and the decoupled rotary
  key (`k_heads = 1`, `k_dim = kv_lora_rank + qk_rope_head_dim`) and no separate value (`v_heads = 0`).

A layer's cache is a tuple of tensors [num_slots, heads, dim]: `(k, v)`, or `(k,)` when there is no value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    k_heads: int
    k_dim: int
    v_heads: int = 0  # 0: no separate value tensor (MLA reads values from the cached latent)
    v_dim: int = 0
    sliding_window: int | None = None  # the layer attends to at most this many past tokens
    dtype: torch.dtype | None = None  # None: the model's dtype

    @classmethod
    def standard(cls, num_kv_heads: int, head_dim: int, sliding_window: int | None = None) -> KVCacheSpec:
        return cls(num_kv_heads, head_dim, num_kv_heads, head_dim, sliding_window)

    def elements_per_token(self) -> int:
        return self.k_heads * self.k_dim + self.v_heads * self.v_dim

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes one token takes in this layer's cache; `dtype` is the model's (used unless the spec sets one)."""
        return self.elements_per_token() * (self.dtype or dtype).itemsize

    def allocate(self, num_slots: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Zeroed cache tensors of this layer: (k [num_slots, k_heads, k_dim], v [num_slots, v_heads, v_dim])
        or (k,) without a value."""
        dt = self.dtype or dtype
        k = torch.zeros((num_slots, self.k_heads, self.k_dim), dtype=dt)
        if not self.v_heads:
            return (k,)
        return k, torch.zeros((num_slots, self.v_heads, self.v_dim), dtype=dt)


def kv_bytes_per_token(specs: list[KVCacheSpec], dtype: torch.dtype) -> int:
    """Bytes one token takes in the cache of every layer together."""
    return sum(s.bytes_per_token(dtype) for s in specs)


def allocate_kv_caches(specs: list[KVCacheSpec], num_slots: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    return [s.allocate(num_slots, dtype) for s in specs]
