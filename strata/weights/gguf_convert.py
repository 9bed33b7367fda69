"""GGUF -> HF folder (config.json, model.safetensors, tokenizer.json, ...) that Strata and transformers load.

Tensor names go from llama.cpp's (`blk.3.attn_q.weight`) to HF's (`model.layers.3.self_attn.q_proj.weight`),
with two layout changes undone:

- llama-architecture attention (Llama, Mistral, Mixtral): llama.cpp reorders the rows of attn_q and
  attn_k inside each head from HF's rotate-half RoPE layout to adjacent pairs; the inverse reorder is
  applied here. The Qwen and OLMoE families use the same RoPE layout in both and are not permuted.
- experts: one `[E, out, in]` tensor per projection (`ffn_gate_exps`) or, in older Mixtral files, one
  tensor per expert (`ffn_gate.E`), become per-expert HF tensors.
- DeepSeek-V2/V3 (`deepseek2`): newer converters split kv_b_proj into `attn_k_b` [H, R, nope] (transposed)
  and `attn_v_b` [H, v, R]; the two are joined back into kv_b_proj [H * (nope + v), R] (older files keep
  `attn_kv_b`). Rotary pairs stay interleaved in both formats: no reorder.

With `keep_quantized`, a `token_embd` of a kept type stays quantized too (`model.embed_tokens` in the
quantization_config; strata/layers/quant_embedding.py dequantizes the rows a lookup reads), and tied embeddings
stay tied: the output projection reads the same blocks.

Values: every type is read as float32 (F32, F16 and BF16 exactly; quantized types dequantized by the
`gguf` package) and stored as bfloat16 where that holds every value of the tensor exactly, else as float16
(F16 tensors) or float32. config.json's torch_dtype is bfloat16 only when every tensor is stored so, else
float32: the model computes on the file's values, never a rounding of them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from strata.errors import WeightsError
from strata.fileio import atomic_dir, check_output_dir
from strata.weights.gguf_config import generation_config, hf_config
from strata.weights.gguf_quantized import PackedWeight, has_kept_types, kept_quantized
from strata.weights.gguf_reader import GGUFFile
from strata.weights.gguf_tokenizer import build_tokenizer

SHARD_BYTES = 2 * 2**30  # tensors held in memory before a shard is written
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {  # llama.cpp per-layer name -> HF name under model.layers.N.
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_DEEPSEEK_LAYER = {  # deepseek2 names that differ from (or are missing in) _LAYER
    "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj", "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj", "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
# Gemma 3 has four norms per block; llama.cpp stores its (1 + weight) norms with the 1 added
_GEMMA3_LAYER = {**_LAYER, "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                 "post_ffw_norm": "post_feedforward_layernorm"}
_GPT_OSS_LAYER = {**_LAYER, "post_attention_norm": "post_attention_layernorm", "attn_sinks": "self_attn.sinks"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+?)(?:\.(\d+))?\.(weight|bias)")
_EXPERTS = re.compile(r"ffn_(gate|up|down)_exps")


def _moe_names(model_type: str) -> tuple[str, dict[str, str]]:
    """(HF prefix of the MoE block, llama.cpp projection -> HF expert projection)."""
    if model_type == "mixtral":
        return "block_sparse_moe", {"gate": "w1", "down": "w2", "up": "w3"}
    return "mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row reorder (pairs (2i, 2i+1) back to (i, i + head_dim/2)); w: [rows, ...]."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# projections whose GGUF tensors may stay quantized (Strata's QuantLinear); routers and embeddings may not
_QUANTIZABLE = re.compile(r"attn_(q|k|v|output)|ffn_(gate|up|down)(_exps|_shexp)?")


def hf_tensors(g: GGUFFile, cfg: dict, keep_quantized: bool = False
               ) -> Iterator[tuple[str, np.ndarray | PackedWeight, str]]:
    """Yields (HF name, float32 array, GGUF name) for every tensor of the file.

    keep_quantized: projections whose type has an exact Strata format come as PackedWeight instead.
    """
    model_type = cfg["model_type"]
    moe, proj = _moe_names(model_type)
    permute = model_type in ("llama", "mixtral")
    deepseek = model_type in ("deepseek_v2", "deepseek_v3")
    layer_names = {"gemma3_text": _GEMMA3_LAYER, "gpt_oss": _GPT_OSS_LAYER}.get(model_type, _LAYER)
    if deepseek:
        layer_names = {**_LAYER, **_DEEPSEEK_LAYER}
    kv_b_parts: dict[str, dict[str, np.ndarray]] = {}  # layer -> the attn_k_b / attn_v_b seen so far
    gemma = model_type == "gemma3_text"
    for name in g.tensors:
        if name in _GLOBAL:
            if name == "output.weight" and cfg["tie_word_embeddings"]:
                continue
            info = g.tensors[name]
            packed = kept_quantized(info.type_name, info.raw.data, info.shape) if (
                keep_quantized and name in ("output.weight", "token_embd.weight")) else None
            w = packed if packed is not None else g.tensor(name)
            yield _GLOBAL[name], w - 1 if gemma and name == "output_norm.weight" else w, name
            continue
        m = _BLOCK.fullmatch(name)
        if not m:
            raise WeightsError(f"{g.path}: tensor '{name}' is not used by {cfg['architectures'][0]} models")
        layer, kind, expert, suffix = m.groups()
        pre = f"model.layers.{layer}."
        info = g.tensors[name]
        packed = kept_quantized(info.type_name, info.raw.data, info.shape) if (
            keep_quantized and suffix == "weight" and _QUANTIZABLE.fullmatch(kind)) else None
        w = packed if packed is not None else g.tensor(name)
        if permute and kind in ("attn_q", "attn_k"):
            heads = cfg["num_attention_heads"] if kind == "attn_q" else cfg["num_key_value_heads"]
            if w.shape[0] != heads * cfg["head_dim"]:  # checked here: the reorder needs whole heads
                raise WeightsError(f"{g.path}: tensor '{name}' has {w.shape[0]} rows, expected {heads} heads x "
                                   f"{cfg['head_dim']} = {heads * cfg['head_dim']} from the metadata")
            w = w.map_rows(partial(unpermute_rope_rows, n_heads=heads)) if packed else unpermute_rope_rows(w, heads)
        if gemma and kind.endswith("norm"):
            w = w - 1  # [H] or [D]: back to transformers' offset from 1
        if model_type == "gpt_oss" and (e := _EXPERTS.fullmatch(kind)):
            yield from _gpt_oss_experts(g, name, e[1], suffix, w, pre)
            continue
        if deepseek and kind in ("attn_k_b", "attn_v_b") and expert is None:
            parts = kv_b_parts.setdefault(layer, {})
            parts[kind] = w
            if len(parts) == 2:
                kv_b = join_kv_b(parts["attn_k_b"], parts["attn_v_b"])
                yield f"{pre}self_attn.kv_b_proj.weight", kv_b, name
        elif deepseek and kind == "exp_probs_b" and suffix == "bias":
            yield f"{pre}mlp.gate.e_score_correction_bias", w, name
        elif kind == "ffn_gate_inp":
            yield f"{pre}{moe}.gate.{suffix}", w, name
        elif kind == "ffn_gate_inp_shexp":
            yield f"{pre}{_LAYER[kind]}.{suffix}", w.reshape(1, -1), name  # [hidden] -> [1, hidden]
        elif (e := _EXPERTS.fullmatch(kind)) and expert is None:
            for i in range(w.shape[0]):  # [E, out, in]
                yield f"{pre}{moe}.experts.{i}.{proj[e[1]]}.{suffix}", w[i], name
        elif expert is not None and kind in ("ffn_gate", "ffn_up", "ffn_down") and model_type == "mixtral":
            yield f"{pre}{moe}.experts.{expert}.{proj[kind[4:]]}.{suffix}", w, name
        elif kind in layer_names and expert is None:
            yield f"{pre}{layer_names[kind]}{'' if kind == 'attn_sinks' else '.' + suffix}", w, name
        else:
            raise WeightsError(f"{g.path}: tensor '{name}' is not used by {cfg['architectures'][0]} models")


def join_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """attn_k_b [H, R, nope] and attn_v_b [H, v, R] -> kv_b_proj.weight [H * (nope + v), R]."""
    if k_b.ndim != 3 or v_b.ndim != 3 or k_b.shape[0] != v_b.shape[0] or k_b.shape[1] != v_b.shape[2]:
        raise WeightsError(f"attn_k_b {list(k_b.shape)} and attn_v_b {list(v_b.shape)} do not split one "
                           f"kv_b_proj (expected [H, R, nope] and [H, v, R])")
    kv = np.concatenate([np.swapaxes(np.asarray(k_b), 1, 2), np.asarray(v_b)], axis=1)  # [H, nope + v, R]
    return kv.reshape(-1, kv.shape[-1])



def _gpt_oss_experts(g: GGUFFile, name: str, proj: str, suffix: str, w: np.ndarray, pre: str):
    """gpt-oss experts as Strata's GptOssExpert holds them: llama.cpp's separate gate and up `[E, I, H]` go back
    into one `gate_up_proj [H, 2I]` per expert with gate and up interleaved (even, odd columns), down
    `[E, H, I]` into `down_proj [I, H]`; biases alike. Yielded when the gate tensor comes, up skipped."""
    if proj == "up":
        return
    if proj == "down":
        for i in range(w.shape[0]):
            yield (f"{pre}mlp.experts.{i}.down_proj{'' if suffix == 'weight' else '_bias'}",
                   w[i].T if suffix == "weight" else w[i], name)
        return
    up_name = name.replace("ffn_gate_exps", "ffn_up_exps")
    if up_name not in g.tensors:
        raise WeightsError(f"{g.path}: tensor '{up_name}' missing (the partner of '{name}')")
    up = g.tensor(up_name)
    if up.shape != w.shape:
        raise WeightsError(f"{g.path}: tensor '{up_name}' has shape {list(up.shape)}, '{name}' {list(w.shape)}")
    both = np.stack([w, up], axis=2)  # weight [E, I, 2, H] / bias [E, I, 2]: gate, up adjacent
    for i in range(w.shape[0]):
        if suffix == "weight":
            yield f"{pre}mlp.experts.{i}.gate_up_proj", both[i].reshape(-1, w.shape[-1]).T, name  # [H, 2I]
        else:
            yield f"{pre}mlp.experts.{i}.gate_up_proj_bias", both[i].reshape(-1), name  # [2I]


def _expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    from strata.models.registry import config_from_dict, model_class

    mc = config_from_dict(cfg, source="config.json")
    with torch.device("meta"):
        model = model_class(mc)(mc)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg["tie_word_embeddings"]:
        shapes.pop("lm_head.weight", None)
    return shapes


def _stored(w: np.ndarray, type_name: str) -> torch.Tensor:
    """The tensor as written: bfloat16 where that holds every value exactly, else float16 for F16, else float32."""
    t = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # a copy: F32 data is a read-only mapping
    b = t.to(torch.bfloat16)
    if torch.equal(b.float(), t):
        return b
    return t.to(torch.float16) if type_name == "F16" else t


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False,
                 keep_quantized: bool | None = False) -> Path:
    """Writes the HF folder into a temporary folder beside out_dir, then renames it to out_dir.

    keep_quantized: projections of a type with an exact Strata format (gguf_quantized.KEPT_FORMATS) stay
    quantized (config.json gets a Strata quantization_config; transformers cannot load such a folder);
    None: only when the file has tensors of such a type (gguf_quantized.has_kept_types). The embedding table
    stays quantized too (tied embeddings stay tied: the head reads the same blocks).
    """
    out = check_output_dir(out_dir, overwrite)
    g = GGUFFile(path)
    if keep_quantized is None:
        keep_quantized = has_kept_types(g)
    cfg = hf_config(g)
    tokenizer, tok_cfg = build_tokenizer(g) if "tokenizer.ggml.model" in g.metadata else (None, None)
    expected = _expected_shapes(cfg)
    with atomic_dir(out) as tmp:
        all_bf16, modules = _write_weights(g, cfg, expected, tmp, keep_quantized)
        # kept blocks hold values bfloat16 does not (d * q + m): a quantized file computes in float32 by default
        cfg["torch_dtype"] = "bfloat16" if all_bf16 and not modules else "float32"
        if modules:
            formats = sorted(set(modules.values()))
            cfg["quantization_config"] = {"quant_method": "strata", "format": "+".join(formats), "modules": modules}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=2) + "\n")
        if tokenizer is not None:
            tok_cfg["model_max_length"] = cfg["max_position_embeddings"]
            tokenizer.save(str(tmp / "tokenizer.json"))
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return out


def _write_weights(g: GGUFFile, cfg: dict, expected: dict[str, tuple[int, ...]], tmp: Path,
                   keep_quantized: bool) -> tuple[bool, dict[str, str]]:
    """Writes model.safetensors (or shards + index).

    Returns whether every float tensor is stored as bfloat16, and the modules kept quantized (name -> format).
    """
    shard: dict[str, torch.Tensor] = {}
    files: list[tuple[str, list[str]]] = []  # (temporary shard name, tensor names)
    seen: set[str] = set()
    size = total = 0
    all_bf16 = True
    modules: dict[str, str] = {}

    def flush() -> None:
        fn = f"shard-{len(files)}.safetensors"
        save_file(shard, str(tmp / fn), metadata={"format": "pt"})
        files.append((fn, list(shard)))
        shard.clear()

    for hf_name, w, gguf_name in hf_tensors(g, cfg, keep_quantized):
        want = expected.get(hf_name)
        if want is None:
            raise WeightsError(f"{g.path}: tensor '{gguf_name}' maps to '{hf_name}', which "
                               f"{cfg['architectures'][0]} with this metadata does not have")
        if tuple(w.shape) != want:
            raise WeightsError(f"{g.path}: tensor '{gguf_name}' has shape {list(w.shape)} as '{hf_name}', expected "
                               f"{list(want)} from the metadata")
        if hf_name in seen:
            raise WeightsError(f"{g.path}: tensor '{gguf_name}' gives '{hf_name}' a second time")
        seen.add(hf_name)
        if isinstance(w, PackedWeight):
            module = hf_name.removesuffix(".weight")
            modules[module] = w.fmt
            stored = {f"{module}.{suffix}": t for suffix, t in w.tensors().items()}
        else:
            stored = {hf_name: _stored(w, g.tensors[gguf_name].type_name)}
            all_bf16 = all_bf16 and stored[hf_name].dtype == torch.bfloat16
        nbytes = sum(t.nbytes for t in stored.values())
        if size and size + nbytes > SHARD_BYTES:
            flush()
            size = 0
        shard.update(stored)
        size += nbytes
        total += nbytes
    missing = [k for k in expected if k not in seen]
    if missing:
        raise WeightsError(f"{g.path}: no tensor for '{missing[0]}'" + (f" (and {len(missing) - 1} more)"
                           if len(missing) > 1 else "") + f", expected shape {list(expected[missing[0]])}")
    flush()
    if len(files) == 1:
        os.replace(tmp / files[0][0], tmp / "model.safetensors")
        return all_bf16, modules
    weight_map = {}
    for i, (fn, names) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(tmp / fn, tmp / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return all_bf16, modules

