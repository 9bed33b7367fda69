"""Tiny random HF checkpoints for the GGUF tests: every family the GGUF converter reads, in shapes GGUF can
express (no llama3 rope scaling, no sliding window), built with transformers once per session."""

import pytest

from tests.models.conftest import COMMON, MOE, save_random_hf

transformers = pytest.importorskip("transformers")

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"rope_theta": 50000.0, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, "rope_scaling": {"rope_type": "yarn",
              "factor": 4.0, "original_max_position_embeddings": 128}}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2,
                "intermediate_size": 64}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=4, shared_expert_intermediate_size=64,
                  decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False, **MOE)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=8, head_dim=16, norm_topk_prob=True,
                  decoder_sparse_step=2, **{**MOE, "moe_intermediate_size": 64})),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, norm_topk_prob=False, clip_qkv=8.0, **MOE)),
}
SEQ = 24


def build(family: str, path):
    cfg_cls, model_cls, extra = FAMILIES[family]
    return save_random_hf(cfg_cls, model_cls, {**COMMON, **extra}, path)


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            cache[family] = (build(family, path), path)
        return cache[family]

    return get
