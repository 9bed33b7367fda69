"""Qwen3 (Qwen3ForCausalLM): per-head RMSNorm on queries and keys before RoPE; Qwen2's sliding-window rule."""

from __future__ import annotations

from dataclasses import dataclass

from strata.models.base import CausalLM
from strata.models.qwen2 import Qwen2Config


@dataclass
class Qwen3Config(Qwen2Config):
    attention_bias_default = False

    def attention_param_count(self) -> int:
        return super().attention_param_count() + 2 * self.head_dim  # q_norm, k_norm over head_dim


class Qwen3ForCausalLM(CausalLM):
    config_class = Qwen3Config
    qk_norm = "head"
