"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3 attention (per-head q/k norm) with routed experts."""

from strata.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    pass
