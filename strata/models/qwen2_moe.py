"""Qwen2-MoE (Qwen2MoeForCausalLM): Qwen2 attention (q/k/v bias) and a shared expert scaled by
sigmoid(shared_expert_gate(x)); decoder_sparse_step / mlp_only_layers pick the dense layers."""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.config import HFFields
from strata.models.qwen2 import Qwen2Config, Qwen2ForCausalLM


@dataclass
class Qwen2MoeConfig(Qwen2Config):
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    needs_experts = True

    @classmethod
    def hf_fields(cls, f: HFFields) -> dict:
        return {**super().hf_fields(f), "decoder_sparse_step": int(f.get("decoder_sparse_step", 1)),
                "mlp_only_layers": list(f.get("mlp_only_layers", []))}

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Same rule as transformers' Qwen2/3-MoE: sparse unless in mlp_only_layers or off the step."""
        if not self.is_moe or layer_idx in self.mlp_only_layers:
            return False
        return (layer_idx + 1) % max(self.decoder_sparse_step, 1) == 0


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    config_class = Qwen2MoeConfig
