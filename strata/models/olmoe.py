"""OLMoE (OlmoeForCausalLM): q/k RMSNorm over the whole projection, optional clip_qkv, routed experts sized by
intermediate_size."""

from __future__ import annotations

from dataclasses import dataclass

from strata.config import HFFields, ModelConfig
from strata.models.base import Attention, CausalLM


@dataclass
class OlmoeConfig(ModelConfig):
    clip_qkv: float | None = None

    needs_experts = True

    @classmethod
    def hf_fields(cls, f: HFFields) -> dict:
        return {**super().hf_fields(f), "moe_intermediate_size": int(f.get("intermediate_size", 0)),
                "clip_qkv": f.get("clip_qkv")}

    def attention_param_count(self) -> int:
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return super().attention_param_count() + q + kv  # q_norm, k_norm over the whole projections


class OlmoeForCausalLM(CausalLM):
    config_class = OlmoeConfig
    qk_norm = "full"

    @classmethod
    def make_attention(cls, cfg: OlmoeConfig, layer_idx: int) -> Attention:
        return Attention(cfg, layer_idx, cls.qk_norm, cls.qkv_bias(cfg), cls.o_bias(cfg), clip_qkv=cfg.clip_qkv)
