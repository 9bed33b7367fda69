"""A tiny random MoE checkpoint with a chat template, for server tests (built with transformers, test-only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}{% if greeting is defined %}{{ greeting }} {% endif %}assistant:{% endif %}"
)


def build_tiny_server_model(path: Path, max_position_embeddings: int = 4096) -> Path:
    """qwen3_moe-shaped random model (4 experts, top-2) + byte-level BPE + tokenizer_config with a template."""
    import transformers

    from tests.models.conftest import save_tiny_tokenizer

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=48, norm_topk_prob=True, decoder_sparse_step=1,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # spread logits so greedy paths are not near-ties
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    save_tiny_tokenizer(path)
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE}))
    return path
