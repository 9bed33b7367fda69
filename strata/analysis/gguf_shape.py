"""A ModelShape and the stored bits per weight of a GGUF file, from its metadata and tensor types (gguf.GGUFReader).

Shapes come from the `{arch}.*` keys llama.cpp writes (embedding_length, block_count, attention.head_count...);
bits per weight are measured per group of tensors (routed experts, other matrices, lm_head) as stored bytes over
elements, so a file's real mix (Q4_K_M's Q6_K tensors, gpt-oss's MXFP4 experts beside Q8_0 attention) is priced.
"""

from __future__ import annotations

import re
import struct
from collections import Counter

from strata.analysis.shapes import ModelShape, shape_from_dict
from strata.errors import ConfigError

# GGUF architecture names whose HF model_type differs where shapes.py keys rules on it
MODEL_TYPES = {"gemma2": "gemma2", "gemma3": "gemma3_text", "gpt-oss": "gpt_oss", "llama4": "llama4_text",
               "phi2": "phi", "gpt2": "gpt2"}
_EXPERT = re.compile(r"_exps\.|\.ffn_(gate|up|down)\.\d+\.")  # stacked (ffn_up_exps) or per-expert (old Mixtral)


def _fields(reader, path: str):
    def get(key: str, default=None):
        f = reader.fields.get(key)
        if f is None:
            return default
        v = f.contents()
        if isinstance(v, list):  # per-layer arrays (head counts, FFN widths of uneven models): the widest layer
            nums = [x for x in v if isinstance(x, (int, float))]
            return max(nums) if nums else default
        return v

    return get


def _group_format(tensors) -> tuple[str, str]:
    """(format for precision.py, description of the types) of a group of (type name, bytes, elements)."""
    if not tensors:
        return "", ""
    types = Counter(t for t, _, _ in tensors)
    nbytes, elems = sum(b for _, b, _ in tensors), sum(e for _, _, e in tensors)
    if set(types) <= {"F16", "BF16"}:
        fmt = "fp16"
    elif set(types) == {"F32"}:
        fmt = "fp32"
    else:
        fmt = f"bpw{8.0 * nbytes / elems:.3f}"
    return fmt, "/".join(t for t, _ in types.most_common())


def read_gguf(path: str) -> tuple[ModelShape, dict[str, str], str]:
    """(shape, formats {'weights', 'experts', 'head'} measured from the tensors, a one-line description)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, struct.error, IndexError, KeyError) as e:  # what gguf raises on foreign files
        raise ConfigError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    get = _fields(reader, path)
    arch = get("general.architecture")
    if not arch:
        raise ConfigError(f"{path}: GGUF metadata lacks 'general.architecture'")

    def need(key: str) -> int:
        v = get(f"{arch}.{key}")
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{path}: GGUF metadata key '{arch}.{key}' must be a positive integer, got {v!r}")
        return v

    names = {t.name: t for t in reader.tensors}
    hidden = need("embedding_length")
    emb = names.get("token_embd.weight")
    vocab = get(f"{arch}.vocab_size") or (int(max(emb.shape)) if emb is not None else None)
    if not vocab and reader.fields.get("tokenizer.ggml.tokens") is not None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    heads = need("attention.head_count")
    cfg = {"architectures": [f"gguf:{arch}"], "model_type": MODEL_TYPES.get(arch, arch), "hidden_size": hidden,
           "num_hidden_layers": need("block_count"), "num_attention_heads": heads,
           "num_key_value_heads": get(f"{arch}.attention.head_count_kv") or heads, "vocab_size": vocab,
           "intermediate_size": get(f"{arch}.feed_forward_length") or 0,
           "tie_word_embeddings": "output.weight" not in names}
    kv_lora = get(f"{arch}.attention.kv_lora_rank") or 0
    key_len = get(f"{arch}.attention.key_length_mla") or get(f"{arch}.attention.key_length")
    if kv_lora:  # MLA: key = nope + rope dims, value = v_head_dim
        rope = get(f"{arch}.rope.dimension_count") or 64
        cfg.update(kv_lora_rank=kv_lora, q_lora_rank=get(f"{arch}.attention.q_lora_rank") or 0,
                   qk_rope_head_dim=rope, qk_nope_head_dim=(key_len or 192) - rope,
                   v_head_dim=get(f"{arch}.attention.value_length_mla") or get(f"{arch}.attention.value_length")
                   or 128)
    elif key_len:
        cfg["head_dim"] = key_len
    experts = get(f"{arch}.expert_count") or 0
    if experts:
        moe_ff = get(f"{arch}.expert_feed_forward_length") or cfg["intermediate_size"]
        cfg.update(num_experts=experts, num_experts_per_tok=get(f"{arch}.expert_used_count") or 0,
                   moe_intermediate_size=moe_ff,
                   first_k_dense_replace=get(f"{arch}.leading_dense_block_count") or 0,
                   interleave_moe_layer_step=get(f"{arch}.interleave_moe_layer_step") or 1)
        shared = get(f"{arch}.expert_shared_feed_forward_length") or (get(f"{arch}.expert_shared_count") or 0) * moe_ff
        if shared:
            cfg["shared_expert_intermediate_size"] = shared
    window = get(f"{arch}.attention.sliding_window") or 0
    if window:
        cfg["sliding_window"] = window
        if arch == "gemma3":
            cfg["sliding_window_pattern"] = 6  # llama.cpp's gemma3: every 6th layer global
        elif arch == "gpt-oss":  # alternating, sliding first
            cfg["layer_types"] = ["sliding" if i % 2 == 0 else "full" for i in range(cfg["num_hidden_layers"])]
    shape = shape_from_dict(cfg, name=str(path).rsplit("/", 1)[-1])
    groups: dict[str, list] = {"weights": [], "experts": [], "head": []}
    for t in reader.tensors:
        if len(t.shape) < 2 or int(min(t.shape)) == 1:
            continue  # norms and biases
        g = ("head" if t.name == ("output.weight" if "output.weight" in names else "token_embd.weight")
             else "experts" if _EXPERT.search(t.name) else "weights" if t.name != "token_embd.weight" else None)
        if g:
            groups[g].append((t.tensor_type.name, int(t.n_bytes), int(t.n_elements)))
    fmts, desc = {}, []
    for g, ts in groups.items():
        fmt, types = _group_format(ts)
        if fmt:
            fmts[g] = fmt
            desc.append(f"{g} {types} ({fmt})")
    if "weights" not in fmts:
        raise ConfigError(f"{path}: GGUF file holds no weight matrices")
    return shape, fmts, f"GGUF {arch}: " + ", ".join(desc)
