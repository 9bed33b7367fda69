"""Qwen2 (Qwen2ForCausalLM): biases on q/k/v (not on o_proj)."""

from strata.models.base import CausalLM


class Qwen2ForCausalLM(CausalLM):
    @staticmethod
    def qkv_bias(cfg) -> bool:
        return True

    @staticmethod
    def o_bias(cfg) -> bool:
        return False
