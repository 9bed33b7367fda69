"""Qwen2-MoE (Qwen2MoeForCausalLM): Qwen2 attention (q/k/v bias) and a shared expert scaled by
sigmoid(shared_expert_gate(x)); decoder_sparse_step / mlp_only_layers pick the dense layers."""

from strata.models.qwen2 import Qwen2ForCausalLM


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    pass
