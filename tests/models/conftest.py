"""Tiny random HF checkpoints of every supported family, built with transformers (test-only) and saved."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=48)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
              rope_theta=50000.0, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=24)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, rope_scaling={"rope_type": "yarn",
              "factor": 4.0, "original_max_position_embeddings": 128})),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                intermediate_size=48)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=4, shared_expert_intermediate_size=64,
                  decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False, **MOE)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=8, head_dim=16, norm_topk_prob=True,
                  decoder_sparse_step=2, **MOE)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, norm_topk_prob=False, clip_qkv=8.0, **MOE)),
}


def build_hf(family: str, path, dtype=torch.float32, seed: int = 0):
    cfg_cls, model_cls, extra = FAMILIES[family]
    return save_random_hf(cfg_cls, model_cls, {**COMMON, **extra}, path, dtype, seed)


def save_random_hf(cfg_cls: str, model_cls: str, cfg_kwargs: dict, path, dtype=torch.float32, seed: int = 0):
    """A transformers model of the named classes with N(0, 0.08) matrices, saved with the tiny tokenizer."""
    cfg = getattr(transformers, cfg_cls)(**cfg_kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).to(dtype).eval()
    with torch.no_grad():  # larger random weights so logits are spread and greedy paths are not ties
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    save_tiny_tokenizer(path)
    return model


def save_tiny_tokenizer(path, vocab_size: int = 300):
    """A byte-level BPE trained in milliseconds on in-code text (<s>=1, </s>=2 like the configs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the quick brown fox jumps over the lazy dog. " * 3, "héllo wörld, ünïcode text 漢字 ok"] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="session")
def hf_family(tmp_path_factory):
    cache = {}

    def get(family: str):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            cache[family] = (build_hf(family, path), str(path))
        return cache[family]

    return get
