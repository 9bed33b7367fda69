"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3 attention (per-head q/k norm) with routed experts; Qwen2-MoE's
decoder_sparse_step / mlp_only_layers rule for the dense layers."""

from __future__ import annotations

from dataclasses import dataclass

from strata.models.qwen2_moe import Qwen2MoeConfig
from strata.models.qwen3 import Qwen3Config, Qwen3ForCausalLM


@dataclass
class Qwen3MoeConfig(Qwen3Config, Qwen2MoeConfig):
    pass


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    config_class = Qwen3MoeConfig
