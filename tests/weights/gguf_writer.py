"""Test helper: an HF checkpoint written as a GGUF file the way llama.cpp's converter lays it out.

llama.cpp's tensor names, the per-head q/k row reorder for llama-architecture attention, experts merged
into `[E, out, in]` tensors (or one tensor per expert, as older Mixtral files have), the tokenizer as
metadata, and matrices optionally quantized with the `gguf` package's own quantizers.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
        "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}
LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
         "block_sparse_moe.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
         "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
         "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}
EXPERT = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's reorder of q/k rows: (i, i + head_dim/2) of each head -> (2i, 2i+1)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(cfg: dict, state: dict[str, np.ndarray], merged_experts: bool) -> dict[str, np.ndarray]:
    model_type = cfg["model_type"]
    out = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    if not cfg.get("tie_word_embeddings"):
        out["output.weight"] = state["lm_head.weight"]
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, w in state.items():
        if not name.startswith("model.layers."):
            continue
        layer, rest = name[len("model.layers."):].split(".", 1)
        module, suffix = rest.rsplit(".", 1)
        if ".experts." in module:
            _, idx, proj = module.rsplit(".", 2)
            experts.setdefault((int(layer), EXPERT[proj]), {})[int(idx)] = w
            continue
        kind = LAYER[module]
        if model_type in ("llama", "mistral", "mixtral") and kind in ("attn_q", "attn_k"):
            w = permute(w, cfg["num_attention_heads"] if kind == "attn_q" else cfg["num_key_value_heads"])
        if kind == "ffn_gate_inp_shexp":
            w = w.reshape(-1)
        out[f"blk.{layer}.{kind}.{suffix}"] = w
    for (layer, proj), by_idx in experts.items():
        if merged_experts:
            out[f"blk.{layer}.ffn_{proj}_exps.weight"] = np.stack([by_idx[i] for i in sorted(by_idx)])
        else:
            for i, w in by_idx.items():
                out[f"blk.{layer}.ffn_{proj}.{i}.weight"] = w
    return out


def _add_metadata(w: gguf.GGUFWriter, cfg: dict, vocab_size: int) -> None:
    model_type = cfg["model_type"]
    heads = cfg["num_attention_heads"]
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(scaling["rope_type"]))
        w.add_rope_scaling_factor(scaling["factor"])
        if "original_max_position_embeddings" in scaling:
            w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(vocab_size)
    w.add_feed_forward_length(cfg["intermediate_size"])
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        if model_type in ("qwen2_moe", "qwen3_moe"):
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if cfg.get("clip_qkv"):
        w.add_clamp_kqv(cfg["clip_qkv"])


def _add_tokenizer(w: gguf.GGUFWriter, hf_dir: Path, cfg: dict, vocab_size: int) -> None:
    """The folder's byte-level BPE tokenizer.json as gpt2-type metadata, padded to the embedding's rows."""
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    tokens = [None] * vocab_size
    for t, i in vocab.items():
        tokens[i] = t
    types = [gguf.TokenType.NORMAL] * vocab_size
    for added in tj.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                        "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def write_gguf(hf_dir: str | Path, out: str | Path, qtype: str = "F32", merged_experts: bool = True,
               tensors=None, num_tokens: int | None = None) -> Path:
    """Writes hf_dir's model as GGUF; matrices become `qtype` where their rows are whole blocks.

    `tensors(named) -> named` edits the GGUF tensors before writing (a value may be a tuple (raw blocks, type
    name) to write blocks made elsewhere) and `num_tokens` sets the vocabulary's length (to make broken files).
    """
    hf_dir, out = Path(hf_dir), Path(out)
    cfg = json.loads((hf_dir / "config.json").read_text())
    state = {k: v.astype(np.float32) for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    named = _gguf_tensors(cfg, state, merged_experts)
    if tensors is not None:
        named = tensors(named)
    vocab_size = num_tokens or named["token_embd.weight"].shape[0]
    w = gguf.GGUFWriter(str(out), ARCH[cfg["model_type"]])
    _add_metadata(w, cfg, vocab_size)
    _add_tokenizer(w, hf_dir, cfg, vocab_size)
    q = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[q][0]
    for name, t in named.items():
        if isinstance(t, tuple):  # (raw uint8 blocks [..., rows, row bytes], type name): written as they are
            w.add_tensor(name, t[0], raw_dtype=gguf.GGMLQuantizationType[t[1]])
        elif t.ndim >= 2 and q != gguf.GGMLQuantizationType.F32 and t.shape[-1] % block == 0:
            w.add_tensor(name, gguf.quants.quantize(t, q), raw_dtype=q)
        else:
            w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
