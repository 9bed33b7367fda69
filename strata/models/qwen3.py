"""Qwen3 (Qwen3ForCausalLM): per-head RMSNorm on queries and keys before RoPE."""

from strata.models.base import CausalLM


class Qwen3ForCausalLM(CausalLM):
    qk_norm = "head"
