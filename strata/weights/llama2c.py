"""llama2.c checkpoints (legacy headerless and version-1 "ak42", fp32) and their export as an HF Llama folder.

The one non-obvious step: llama2.c rotates adjacent pairs (2i, 2i+1) of each head, HF Llama rotates
(i, i + head_dim/2). Reordering the output rows of wq and wk inside each head turns one into the other;
q·k is unchanged because q and k get the same reordering.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from strata.errors import UnsupportedError, WeightsError
from strata.fileio import atomic_dir, check_output_dir
from strata.weights.sp_tokenizer import SpVocab, build_tokenizer, read_sp_vocab, tokenizer_config

MAGIC = 0x616B3432  # "ak42"
LEGACY_HEADER_BYTES = 7 * 4
V1_HEADER_BYTES = 256


@dataclass
class Llama2cConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    version: int  # 0 = legacy headerless export

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size


@dataclass
class Llama2cCheckpoint:
    config: Llama2cConfig
    tensors: dict[str, np.ndarray]  # llama2.c names, stacked over layers: wq [L, dim, dim] ...
    source: str


def _layout(c: Llama2cConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Arrays in file order; `freq_cis_*` only exist in legacy files and are skipped on export."""
    L, D, H, KV, V = c.n_layers, c.dim, c.hidden_dim, c.kv_dim, c.vocab_size
    mats = [
        ("wq", (L, D, D)), ("wk", (L, KV, D)), ("wv", (L, KV, D)), ("wo", (L, D, D)),
    ]
    ffn = [("w1", (L, H, D)), ("w2", (L, D, H)), ("w3", (L, H, D))]
    if c.version == 0:
        half = c.head_size // 2
        out = [("token_embedding", (V, D)), ("rms_att", (L, D)), *mats, ("rms_ffn", (L, D)), *ffn,
               ("rms_final", (D,)), ("freq_cis_real", (c.seq_len, half)), ("freq_cis_imag", (c.seq_len, half))]
    else:
        out = [("rms_att", (L, D)), ("rms_ffn", (L, D)), ("rms_final", (D,)), ("token_embedding", (V, D)),
               *mats, *ffn]
    if not c.shared_classifier:
        out.append(("wcls", (V, D)))
    return out


def _read_header(buf: bytes, source: str) -> tuple[Llama2cConfig, int]:
    if len(buf) < LEGACY_HEADER_BYTES:
        raise WeightsError(f"{source}: truncated llama2.c checkpoint ({len(buf)} bytes, header needs 28)")
    (magic,) = struct.unpack_from("<I", buf, 0)
    if magic == MAGIC:
        if len(buf) < V1_HEADER_BYTES:
            raise WeightsError(f"{source}: truncated llama2.c checkpoint ({len(buf)} bytes, header needs 256)")
        (version,) = struct.unpack_from("<i", buf, 4)
        if version == 2:
            raise UnsupportedError(f"{source}: llama2.c version 2 (int8 Q8_0) checkpoints are not supported; "
                                   "export with --version 1 (fp32)")
        if version != 1:
            raise WeightsError(f"{source}: unknown llama2.c checkpoint version {version} (expected 1)")
        ints = struct.unpack_from("<7i", buf, 8)
        shared = bool(buf[36])
        offset = V1_HEADER_BYTES
    else:
        version, offset = 0, LEGACY_HEADER_BYTES
        ints = struct.unpack_from("<7i", buf, 0)
        shared = ints[5] > 0  # legacy files mark a separate classifier with a negative vocab_size
        ints = ints[:5] + (abs(ints[5]),) + ints[6:]
    c = Llama2cConfig(*ints, shared_classifier=shared, version=version)
    if min(ints) <= 0 or c.dim % c.n_heads or c.n_heads % c.n_kv_heads or c.head_size % 2:
        raise WeightsError(
            f"{source}: bad magic: expected 0x{MAGIC:08x} ('ak42') or a legacy llama2.c header, found "
            f"dim={ints[0]} hidden_dim={ints[1]} n_layers={ints[2]} n_heads={ints[3]} n_kv_heads={ints[4]} "
            f"vocab_size={ints[5]} seq_len={ints[6]}"
        )
    return c, offset


def read_llama2c(path: str | Path) -> Llama2cCheckpoint:
    """Reads a legacy or version-1 llama2.c checkpoint; the file size must match what the header implies."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: checkpoint file not found")
    size = p.stat().st_size
    with open(p, "rb") as f:
        c, offset = _read_header(f.read(V1_HEADER_BYTES), str(p))
    layout = _layout(c)
    expected = offset + 4 * sum(int(np.prod(shape)) for _, shape in layout)
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise WeightsError(f"{p}: {what}: header (dim={c.dim}, n_layers={c.n_layers}, vocab_size={c.vocab_size}, "
                           f"version={c.version}) implies {expected} bytes, file has {size}")
    buf = np.memmap(p, dtype=np.uint8, mode="r")  # big checkpoints are not read into memory twice
    tensors = {}
    for name, shape in layout:
        n = int(np.prod(shape))
        tensors[name] = np.frombuffer(buf, dtype="<f4", count=n, offset=offset).reshape(shape)
        offset += 4 * n
    return Llama2cCheckpoint(config=c, tensors=tensors, source=str(p))


def _rotary_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows (2i, 2i+1) of each head become rows (i, i + head_size/2): [n_heads*hs, dim] -> same shape."""
    rows, dim = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, dim).transpose(0, 2, 1, 3).reshape(rows, dim)


def hf_state_dict(ckpt: Llama2cCheckpoint) -> dict[str, torch.Tensor]:
    c, t = ckpt.config, ckpt.tensors
    out = {"model.embed_tokens.weight": t["token_embedding"], "model.norm.weight": t["rms_final"]}
    for i in range(c.n_layers):
        pre = f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = t["rms_att"][i]  # [dim]
        out[pre + "post_attention_layernorm.weight"] = t["rms_ffn"][i]
        out[pre + "self_attn.q_proj.weight"] = _rotary_to_half(t["wq"][i], c.n_heads)  # [dim, dim]
        out[pre + "self_attn.k_proj.weight"] = _rotary_to_half(t["wk"][i], c.n_kv_heads)  # [kv_dim, dim]
        out[pre + "self_attn.v_proj.weight"] = t["wv"][i]
        out[pre + "self_attn.o_proj.weight"] = t["wo"][i]
        out[pre + "mlp.gate_proj.weight"] = t["w1"][i]  # [hidden, dim]
        out[pre + "mlp.down_proj.weight"] = t["w2"][i]  # [dim, hidden]
        out[pre + "mlp.up_proj.weight"] = t["w3"][i]  # [hidden, dim]
    if not c.shared_classifier:
        out["lm_head.weight"] = t["wcls"]
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in out.items()}


def hf_config(c: Llama2cConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": c.seq_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": c.shared_classifier,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
    }


def generation_config() -> dict:
    # run.c never stops on EOS but stops when the model emits BOS (TinyStories separates stories with BOS)
    return {"bos_token_id": 1, "eos_token_id": [2, 1], "do_sample": False}


def _readme(ckpt: Llama2cCheckpoint, vocab: SpVocab) -> str:
    c = ckpt.config
    return (
        "# Converted from llama2.c\n\n"
        f"- checkpoint: `{Path(ckpt.source).name}` (llama2.c format version {c.version}; 0 = legacy), "
        f"tokenizer: `{Path(vocab.source).name}`\n"
        f"- dim {c.dim}, hidden_dim {c.hidden_dim}, layers {c.n_layers}, heads {c.n_heads}/{c.n_kv_heads} (q/kv), "
        f"vocab {c.vocab_size}, seq_len {c.seq_len}, shared classifier {c.shared_classifier}\n"
        "- wq/wk rows are permuted per head from llama2.c's adjacent-pair RoPE to HF's rotate_half layout.\n"
        "- As in run.c, an empty prompt starts generation from BOS alone (the tokenizer encodes \"\" as [1]).\n"
        "- As in run.c, generation stops when the model emits BOS (id 1): generation_config lists eos [2, 1].\n"
        "- The tokenizer encodes like SentencePiece: runs of spaces collapse and leading/trailing spaces are\n"
        "  dropped (run.c's own encoder keeps them); literal `<s>`, `</s>`, `<unk>` in text are special tokens.\n"
    )


def convert_llama2c(checkpoint: str | Path, tokenizer: str | Path, out_dir: str | Path,
                    overwrite: bool = False) -> Path:
    """Writes config.json, generation_config.json, model.safetensors, tokenizer(_config).json into out_dir."""
    out = check_output_dir(out_dir, overwrite)
    ckpt = read_llama2c(checkpoint)
    vocab = read_sp_vocab(tokenizer)
    if len(vocab.pieces) != ckpt.config.vocab_size:
        raise WeightsError(f"{vocab.source}: tokenizer has {len(vocab.pieces)} pieces but checkpoint "
                           f"{ckpt.source} has vocab_size {ckpt.config.vocab_size}")
    with atomic_dir(out) as tmp:
        save_file(hf_state_dict(ckpt), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config(ckpt.config))
        _write_json(tmp / "generation_config.json", generation_config())
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(vocab, ckpt.config.seq_len))
        build_tokenizer(vocab).save(str(tmp / "tokenizer.json"))
        (tmp / "README.md").write_text(_readme(ckpt, vocab))
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
