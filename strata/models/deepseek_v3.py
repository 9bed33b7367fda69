"""DeepSeek-V3 / R1 (DeepseekV3ForCausalLM): DeepSeek-V2's latent attention and MoE (deepseek_v2.py) with
sigmoid routing: experts chosen by score + e_score_correction_bias among the topk_group best of n_group
groups, weighted by their unbiased scores (renormalised when norm_topk_prob) times routed_scaling_factor.
`rope_interleave` false selects the rotate-half rotary layout."""

from __future__ import annotations

from dataclasses import dataclass

from strata.models.deepseek_v2 import DeepseekV2Config, DeepseekV2ForCausalLM


@dataclass
class DeepseekV3Config(DeepseekV2Config):
    default_scoring = "sigmoid"


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    config_class = DeepseekV3Config
