"""OLMoE (OlmoeForCausalLM): q/k RMSNorm over the whole projection, optional clip_qkv, routed experts."""

from strata.models.base import CausalLM


class OlmoeForCausalLM(CausalLM):
    qk_norm = "full"
