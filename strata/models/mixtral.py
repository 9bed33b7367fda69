"""Mixtral (MixtralForCausalLM): every layer sparse, block named block_sparse_moe, experts w1/w2/w3 sized by
intermediate_size, top-k probabilities always renormalised, routing weights kept float32."""

from __future__ import annotations

from dataclasses import dataclass

from strata.config import HFFields, ModelConfig
from strata.layers.mlp import MixtralExpert
from strata.models.base import CausalLM


@dataclass
class MixtralConfig(ModelConfig):
    needs_experts = True

    @classmethod
    def hf_fields(cls, f: HFFields) -> dict:
        # experts are sized by intermediate_size; the top-k probabilities are always renormalised
        return {**super().hf_fields(f), "moe_intermediate_size": int(f.get("intermediate_size", 0)),
                "norm_topk_prob": True}


class MixtralForCausalLM(CausalLM):
    config_class = MixtralConfig
    mlp_name = "block_sparse_moe"
    cast_routing_weights = False

    @classmethod
    def make_expert(cls, cfg):
        return MixtralExpert(cfg.hidden_size, cfg.moe_intermediate_size)
