"""Mixtral (MixtralForCausalLM): every layer sparse, block named block_sparse_moe, experts w1/w2/w3,
top-k probabilities always renormalised."""

from strata.layers.mlp import MixtralExpert
from strata.models.base import CausalLM


class MixtralForCausalLM(CausalLM):
    mlp_name = "block_sparse_moe"

    @classmethod
    def make_expert(cls, cfg):
        return MixtralExpert(cfg.hidden_size, cfg.moe_intermediate_size)
