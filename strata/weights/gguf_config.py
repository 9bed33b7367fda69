"""config.json (HF field names) from a GGUF file's metadata, for the architectures Strata converts.

llama.cpp writes the model's shape under `<arch>.<key>` (`llama.block_count`, `qwen3moe.expert_count`...).
Mixtral is stored as architecture `llama` with `llama.expert_count`; Mistral as plain `llama` (its sliding
window is not in the file, and llama.cpp does not use one either). DeepSeek-V2/V3 are `deepseek2`: sigmoid
gating (`expert_gating_func` 2) makes it V3, anything else V2 (llama.cpp reads a missing key as softmax).
"""

from __future__ import annotations

import re

from strata.errors import UnsupportedError, WeightsError
from strata.weights.gguf_reader import GGUFFile

# GGUF general.architecture -> (HF architecture, HF model_type); llama with experts becomes Mixtral
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "olmoe": ("OlmoeForCausalLM", "olmoe"),
    "deepseek2": ("DeepseekV2ForCausalLM", "deepseek_v2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    "gpt-oss": ("GptOssForCausalLM", "gpt_oss"),
}
DEEPSEEK_V3 = ("DeepseekV3ForCausalLM", "deepseek_v3")
_SIGMOID_GATING = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
MIXTRAL = ("MixtralForCausalLM", "mixtral")
# whether llama.cpp renormalises the top-k router weights, when the file does not say (expert_weights_norm)
_NORM_TOPK = {"qwen2moe": False, "qwen3moe": True, "olmoe": False}
_DENSE_FFN = re.compile(r"blk\.(\d+)\.ffn_gate\.weight")


def gguf_architecture(g: GGUFFile) -> tuple[str, str]:
    """(HF architecture, model_type) of the file, or UnsupportedError naming its architecture."""
    arch = g.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedError(f"{g.path}: GGUF architecture {arch!r} is not supported "
                               f"(supported: {', '.join(sorted(ARCHITECTURES))}, and llama-architecture Mixtral)")
    if arch == "llama" and (g.get("llama.expert_count") or 0) > 0:
        return MIXTRAL
    if arch == "deepseek2" and _int(g, "deepseek2.expert_gating_func") == _SIGMOID_GATING:
        return DEEPSEEK_V3
    return ARCHITECTURES[arch]


def _int(g: GGUFFile, key: str, default=None) -> int | None:
    v = g.get(key, default)
    if isinstance(v, list):  # per-layer values (some newer files): one value for every layer is all Strata models
        if len(set(v)) != 1:
            raise UnsupportedError(f"{g.path}: metadata field '{key}' differs between layers ({sorted(set(v))})")
        v = v[0]
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise WeightsError(f"{g.path}: metadata field '{key}' must be an integer, got {v!r}")
    return int(v)


def _rope_scaling(g: GGUFFile, arch: str) -> dict | None:
    if "rope_freqs.weight" in g.tensors:
        raise UnsupportedError(f"{g.path}: tensor 'rope_freqs.weight' (per-dimension RoPE factors, as for Llama 3.1+ "
                               f"rope scaling) is not supported")
    kind = g.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = float(g.get(f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = _int(g, f"{arch}.rope.scaling.original_context_length")
        out = {"rope_type": "yarn", "factor": factor}
        if original:
            out["original_max_position_embeddings"] = original
        return out
    raise UnsupportedError(f"{g.path}: metadata field '{arch}.rope.scaling.type' is {kind!r} "
                           f"(supported: none, linear, yarn)")


def _layer_types(g: GGUFFile, arch: str, layers: int, default_pattern: int) -> list[str]:
    """Sliding or full attention per layer as llama.cpp reads it: `attention.sliding_window_pattern` as one
    flag per layer, or a period n (layer i slides unless i % n == n - 1), else the architecture's period."""
    pattern = g.get(f"{arch}.attention.sliding_window_pattern", default_pattern)
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise WeightsError(f"{g.path}: metadata field '{arch}.attention.sliding_window_pattern' has "
                               f"{len(pattern)} entries for {layers} layers")
        sliding = [bool(p) for p in pattern]
    else:
        n = int(pattern)
        sliding = [n == 0 or i % n < n - 1 for i in range(layers)]
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def _family_fields(g: GGUFFile, arch: str, model_type: str, cfg: dict) -> None:
    """The config.json keys of Gemma 3 and GPT-OSS, with llama.cpp's fixed values where the file has none."""
    layers, window = cfg["num_hidden_layers"], _int(g, f"{arch}.attention.sliding_window")
    if model_type == "gemma3_text":
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
        cfg["layer_types"] = _layer_types(g, arch, layers, 6) if window else ["full_attention"] * layers
        cfg["sliding_window"] = window or 4096
        cfg["rope_local_base_freq"] = float(g.get(f"{arch}.rope.freq_base_swa", 10000.0))
        cfg["final_logit_softcapping"] = g.get(f"{arch}.final_logit_softcapping")
        # not in the file: llama.cpp scales queries by head_dim ** -0.5, or (hidden / heads) ** -0.5 for the
        # 62-layer 27B, which is what the released configs' query_pre_attn_scalar says
        per_head = cfg["hidden_size"] // cfg["num_attention_heads"]
        cfg["query_pre_attn_scalar"] = per_head if layers == 62 else cfg["head_dim"]
    else:  # gpt_oss: llama.cpp fixes the SwiGLU clamp (alpha 1.702, limit 7) and has no yarn truncation flag
        cfg["layer_types"] = _layer_types(g, arch, layers, 2)
        cfg["sliding_window"] = window or 128
        cfg["swiglu_limit"] = 7.0
        cfg["swiglu_alpha"] = 1.702
        if cfg["rope_scaling"] and cfg["rope_scaling"]["rope_type"] == "yarn":
            cfg["rope_scaling"].update(
                beta_fast=float(g.get(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
                beta_slow=float(g.get(f"{arch}.rope.scaling.yarn_beta_slow", 1.0)),
                truncate=False)  # the released gpt-oss configs' rule (transformers); llama.cpp rounds the ramp


def hf_config(g: GGUFFile) -> dict:
    """The config.json dict; every shape field comes from the file, none from a class default."""
    arch = g.architecture
    hf_arch, model_type = gguf_architecture(g)

    def need(key: str) -> int:
        v = _int(g, f"{arch}.{key}")
        if v is None or v <= 0:
            raise WeightsError(f"{g.path}: metadata field '{arch}.{key}' missing or not positive")
        return v

    hidden, layers, heads = need("embedding_length"), need("block_count"), need("attention.head_count")
    kv_heads = _int(g, f"{arch}.attention.head_count_kv") or heads
    head_dim = _int(g, f"{arch}.attention.key_length") or hidden // heads
    rotary = _int(g, f"{arch}.rope.dimension_count")
    if arch == "deepseek2":  # latent attention: the rotary part is the decoupled key only
        kv_heads, head_dim = heads, rotary
    if rotary is not None and rotary != head_dim:
        raise UnsupportedError(f"{g.path}: metadata field '{arch}.rope.dimension_count' is {rotary}, not the "
                               f"head size {head_dim} (partial rotary embeddings are not supported)")
    if "token_embd.weight" not in g.tensors:
        raise WeightsError(f"{g.path}: tensor 'token_embd.weight' missing")
    vocab = g.tensors["token_embd.weight"].shape[0]
    tokens = g.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != vocab:
        raise WeightsError(f"{g.path}: tensor 'token_embd.weight' has {vocab} rows but the vocabulary "
                           f"('tokenizer.ggml.tokens') has {len(tokens)} tokens")
    eos = g.get("tokenizer.ggml.eos_token_id")
    cfg = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": _int(g, f"{arch}.context_length") or 2048,
        "rms_norm_eps": float(g.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(g, arch),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": g.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "pad_token_id": g.get("tokenizer.ggml.padding_token_id"),
        "attention_bias": "blk.0.attn_q.bias" in g.tensors,
        "use_cache": True,
    }
    if model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = None
    ff = _int(g, f"{arch}.feed_forward_length")
    experts = _int(g, f"{arch}.expert_count") or 0
    if model_type in ("gemma3_text", "gpt_oss"):
        _family_fields(g, arch, model_type, cfg)
    if model_type == "gpt_oss":
        cfg["num_local_experts"] = need("expert_count")
        cfg["num_experts_per_tok"] = need("expert_used_count")
        cfg["intermediate_size"] = _int(g, f"{arch}.expert_feed_forward_length") or ff
    elif model_type == "mixtral" or model_type == "olmoe":
        cfg["intermediate_size"] = _int(g, f"{arch}.expert_feed_forward_length") or ff
        cfg["num_local_experts" if model_type == "mixtral" else "num_experts"] = experts
        cfg["num_experts_per_tok"] = need("expert_used_count")
        if model_type == "olmoe":
            cfg["norm_topk_prob"] = bool(g.get(f"{arch}.expert_weights_norm", _NORM_TOPK[arch]))
            clamp = g.get(f"{arch}.attention.clamp_kqv")
            cfg["clip_qkv"] = float(clamp) if clamp else None
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        cfg["num_experts"] = need("expert_count")
        cfg["num_experts_per_tok"] = need("expert_used_count")
        cfg["moe_intermediate_size"] = need("expert_feed_forward_length")
        cfg["intermediate_size"] = ff or cfg["moe_intermediate_size"]
        shared = _int(g, f"{arch}.expert_shared_feed_forward_length") or 0
        if model_type == "qwen2_moe":
            cfg["shared_expert_intermediate_size"] = shared
        cfg["norm_topk_prob"] = bool(g.get(f"{arch}.expert_weights_norm", _NORM_TOPK[arch]))
        cfg["decoder_sparse_step"] = 1
        cfg["mlp_only_layers"] = sorted(int(m[1]) for n in g.tensors if (m := _DENSE_FFN.fullmatch(n)))
    elif arch == "deepseek2":
        cfg.update(_deepseek2(g, need, heads, model_type == "deepseek_v3"))
        cfg["intermediate_size"] = ff or cfg["moe_intermediate_size"]
    else:
        if not ff:
            raise WeightsError(f"{g.path}: metadata field '{arch}.feed_forward_length' missing or not positive")
        cfg["intermediate_size"] = ff
    return cfg


def _deepseek2(g: GGUFFile, need, heads: int, sigmoid: bool) -> dict:
    """DeepSeek-V2/V3's config.json fields from `deepseek2.*` (llama.cpp's converter names in the comments)."""
    rope = need("rope.dimension_count")  # qk_rope_head_dim
    qk = need("attention.key_length_mla")  # qk_nope_head_dim + qk_rope_head_dim
    bias = next((n for n in g.tensors if n.endswith(".exp_probs_b.bias")), None)
    if bias and not sigmoid:
        raise UnsupportedError(f"{g.path}: tensor '{bias}' with softmax expert gating is not "
                               f"supported (DeepSeek-V3 files set deepseek2.expert_gating_func = 2, sigmoid)")
    groups = _int(g, "deepseek2.expert_group_count") or 1
    out = {
        "q_lora_rank": _int(g, "deepseek2.attention.q_lora_rank"),
        "kv_lora_rank": need("attention.kv_lora_rank"),
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": qk - rope,
        "v_head_dim": need("attention.value_length_mla"),
        "n_routed_experts": need("expert_count"),
        "num_experts_per_tok": need("expert_used_count"),
        "moe_intermediate_size": need("expert_feed_forward_length"),
        "n_shared_experts": _int(g, "deepseek2.expert_shared_count") or 0,
        "first_k_dense_replace": _int(g, "deepseek2.leading_dense_block_count") or 0,
        "routed_scaling_factor": float(g.get("deepseek2.expert_weights_scale", 1.0)),
        "norm_topk_prob": bool(g.get("deepseek2.expert_weights_norm", False)),
        "n_group": groups,
        "topk_group": _int(g, "deepseek2.expert_group_used_count") or groups,
        "scoring_func": "sigmoid" if sigmoid else "softmax",
        "topk_method": "noaux_tc" if sigmoid else ("group_limited_greedy" if groups > 1 else "greedy"),
        "num_key_value_heads": heads,
    }
    log_mul = g.get("deepseek2.rope.scaling.yarn_log_multiplier")
    scaling = _rope_scaling(g, "deepseek2")
    if scaling and log_mul:  # the converter writes 0.1 * mscale_all_dim; DeepSeek's configs set mscale to match
        scaling["mscale"] = scaling["mscale_all_dim"] = float(log_mul) / 0.1
    if scaling and scaling["rope_type"] == "yarn":
        for key in ("beta_fast", "beta_slow"):
            v = g.get(f"deepseek2.rope.scaling.yarn_{key}")
            if v is not None:
                scaling[key] = float(v)
    out["rope_scaling"] = scaling
    return out


def generation_config(cfg: dict) -> dict:
    out = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    return out
