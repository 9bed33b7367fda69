"""GGUF shapes and bits per weight: a tiny MoE GGUF written with gguf.GGUFWriter, read back by `--model`."""

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from strata.analysis.models import resolve_model
from strata.cli import main
from strata.errors import ConfigError

H, FF, EFF, E, K, L, V, HEADS, KV = 64, 96, 32, 4, 2, 2, 128, 4, 2


def _tensor(w: GGUFWriter, name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> None:
    data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if qtype == GGMLQuantizationType.F32:
        w.add_tensor(name, data)
    elif qtype == GGMLQuantizationType.F16:
        w.add_tensor(name, data.astype(np.float16))
    else:
        w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)  # bytes per row; the writer derives the shape


def write_moe_gguf(path, tied=False):
    w = GGUFWriter(str(path), arch="qwen3moe")
    w.add_block_count(L)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_key_length(32)
    w.add_value_length(32)
    w.add_expert_count(E)
    w.add_expert_used_count(K)
    w.add_expert_feed_forward_length(EFF)
    q8, q4 = GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0
    _tensor(w, "token_embd.weight", (V, H), q8)
    if not tied:
        _tensor(w, "output.weight", (V, H), GGMLQuantizationType.F16)
    _tensor(w, "output_norm.weight", (H,), GGMLQuantizationType.F32)
    for i in range(L):
        _tensor(w, f"blk.{i}.attn_norm.weight", (H,), GGMLQuantizationType.F32)
        _tensor(w, f"blk.{i}.attn_q.weight", (HEADS * 32, H), q8)
        _tensor(w, f"blk.{i}.attn_k.weight", (KV * 32, H), q8)
        _tensor(w, f"blk.{i}.attn_v.weight", (KV * 32, H), q8)
        _tensor(w, f"blk.{i}.attn_output.weight", (H, HEADS * 32), q8)
        _tensor(w, f"blk.{i}.ffn_gate_inp.weight", (E, H), GGMLQuantizationType.F32)
        for m in ("gate", "up"):
            _tensor(w, f"blk.{i}.ffn_{m}_exps.weight", (E, EFF, H), q4)
        _tensor(w, f"blk.{i}.ffn_down_exps.weight", (E, H, EFF), q4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_shapes_and_bits_come_from_the_gguf_metadata_and_tensor_types(tmp_path):
    r = resolve_model(str(write_moe_gguf(tmp_path / "tiny-moe.gguf")))
    s = r.shape
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.head_dim, s.vocab) == (H, L, HEADS, KV, 32, V)
    assert (s.num_experts, s.top_k, s.moe_intermediate) == (E, K, EFF) and all(s.moe_layer)
    assert not s.tie_embeddings
    # Q4_0 = 18 bytes per 32 weights, Q8_0 = 34 per 32: bits measured from the tensors, not from the file type;
    # the other matrices are Q8_0 attention plus the F32 router
    attn, router = 2 * HEADS * 32 * H + 2 * KV * 32 * H, E * H
    other_bits = 8 * (attn * 34 / 32 + router * 4) / (attn + router)
    assert r.formats == {"experts": "bpw4.500", "weights": f"bpw{other_bits:.3f}", "head": "fp16"}
    assert "Q4_0" in r.notes[0] and "Q8_0" in r.notes[0]
    routed = s.param_counts()["experts"]
    assert routed == L * E * 3 * H * EFF


def test_tied_gguf_and_cli_prediction(tmp_path, capsys):
    path = write_moe_gguf(tmp_path / "tied.gguf", tied=True)
    r = resolve_model(str(path))
    assert r.shape.tie_embeddings and r.formats["head"] == "bpw8.500"  # token_embd serves as lm_head
    assert main(["analyze", "--model", str(path), "--hardware", "rtx4090", "--engine", "llama.cpp", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tpot_ms"] > 0 and any("GGUF qwen3moe" in a for a in out["assumptions"])


def test_not_a_gguf_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 7)
    with pytest.raises(ConfigError, match="bad.gguf"):
        resolve_model(str(bad))
