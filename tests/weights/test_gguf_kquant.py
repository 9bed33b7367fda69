"""A llama GGUF whose projections are K-quant blocks (Q4_K, Q5_K, Q6_K mixed, as in Q4_K_M): Strata keeps them
quantized and its logits equal transformers' on the same file and Strata's own float conversion."""

from __future__ import annotations

import json
import re

import pytest
import torch

from strata.layers.attention import AttentionMetadata
from strata.layers.quant_embedding import QuantEmbedding
from strata.layers.quant_linear import QuantLinear
from strata.quant.kquant import GGUF_TYPES, random_blocks
from strata.weights.gguf_convert import convert_gguf
from strata.weights.loader import load_model
from tests.models.conftest import COMMON, save_tiny_tokenizer
from tests.weights.gguf_writer import write_gguf

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

_PROJ = re.compile(r"output|blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))")
GGUF_NAME = {v: k for k, v in GGUF_TYPES.items()}
KINDS = ["q4_k", "q5_k", "q6_k"]


def _kind(name: str) -> str:
    """Mixed as llama.cpp's Q4_K_M mixes them, with q/k/v and gate/up alike within a layer (so they fuse)."""
    if name in ("output.weight", "blk.0.ffn_down.weight") or name.startswith(("blk.1.ffn_gate", "blk.1.ffn_up")):
        return "q6_k"
    if name.startswith(("blk.1.attn_q", "blk.1.attn_k", "blk.1.attn_v", "blk.1.ffn_down")):
        return "q5_k"
    return "q4_k"


@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory):
    """Random llama (widths multiple of 256) as GGUF; every projection and the embedding made of random blocks."""
    path = tmp_path_factory.mktemp("kq")
    cfg = transformers.LlamaConfig(**{**COMMON, "hidden_size": 256, "intermediate_size": 512,
                                      "num_hidden_layers": 2, "tie_word_embeddings": False})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    save_tiny_tokenizer(path)
    kinds: dict[str, str] = {}

    def blocks(named):
        for i, (name, t) in enumerate(sorted(named.items())):
            if _PROJ.fullmatch(name.removesuffix(".weight")) or name == "token_embd.weight":
                kind = _kind(name)
                kinds[name] = kind
                named[name] = (random_blocks(kind, t.shape[0], t.shape[1], seed=i, scale=2e-4).numpy(),
                               GGUF_NAME[kind])
        return named

    return write_gguf(path, path / "m.gguf", tensors=blocks, num_tokens=COMMON["vocab_size"]), kinds


def _logits(folder, ids, dtype=None):
    model = load_model(str(folder), dtype=dtype, progress=False)
    with torch.no_grad():
        return model(ids, torch.arange(len(ids)), AttentionMetadata.no_cache([len(ids)])), model


def test_kquant_gguf_stays_quantized_and_matches(kquant_gguf, tmp_path):
    gguf_path, kinds = kquant_gguf
    assert set(kinds.values()) == set(KINDS)
    ids = torch.randint(3, COMMON["vocab_size"], (24,), generator=torch.Generator().manual_seed(1))
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(ids[None]).logits[0]

    floats = convert_gguf(gguf_path, tmp_path / "float")
    assert "quantization_config" not in json.loads((floats / "config.json").read_text())
    float_logits, _ = _logits(floats, ids)
    torch.testing.assert_close(float_logits, ref, atol=1e-4, rtol=1e-4)

    quant = convert_gguf(gguf_path, tmp_path / "quant", keep_quantized=True)
    modules = json.loads((quant / "config.json").read_text())["quantization_config"]["modules"]
    assert modules["model.layers.0.self_attn.q_proj"] == kinds["blk.0.attn_q.weight"]
    assert modules["lm_head"] == kinds["output.weight"]
    assert modules["model.embed_tokens"] == kinds["token_embd.weight"]  # the table stays quantized (rows dequantized)
    assert len(modules) == 2 * 7 + 2  # every projection, the head and the embedding
    logits, model = _logits(quant, ids)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear | QuantEmbedding)}
    assert {n: str(m.fmt) for n, m in quantized.items()} == modules
    # bf16 activations through 2 layers: 1-15% of the logits' scale with this random model, depending on the ids
    # (measured over seeds, exactly dequantized weights alike); the quantized kernels may add little to that, while
    # wrong blocks would be off by ~100%
    err = (logits - ref).abs().max() / ref.abs().max()
    bf16_logits, _ = _logits(floats, ids, dtype="bfloat16")
    err_bf16 = (bf16_logits.float() - ref).abs().max() / ref.abs().max()
    assert err < 1.5 * err_bf16 + 1e-2, (err, err_bf16)
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_kquant_gguf_decodes_natively_from_the_file(kquant_gguf, tmp_path, monkeypatch):
    """LLM("m.gguf") keeps the K-quant blocks (one-call native decode over them) and gives the tokens of the
    per-op path."""
    from strata.layers.linear import bf16_lib
    from tests.models.test_native_decode import _greedy

    if bf16_lib() is None:
        pytest.skip("native kernels unavailable on this machine")
    gguf_path, _ = kquant_gguf
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path))
    native, calls = _greedy(gguf_path, monkeypatch, native=True)
    assert calls > 0
    (folder,) = [f for f in (tmp_path / "gguf").iterdir() if f.name.startswith("m-")]  # converted once, cached
    assert "quantization_config" in json.loads((folder / "config.json").read_text())  # K-quants kept
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path))
    reference, _ = _greedy(gguf_path, monkeypatch, native=False)
    assert native == reference


def test_cli_convert_keeps_kquants_with_keep_quantized(kquant_gguf, tmp_path, capsys):
    from strata.cli import main

    gguf_path, _ = kquant_gguf
    for flags, quantized in (([], False), (["--keep-quantized"], True)):
        out = tmp_path / f"out{len(flags)}"
        assert main(["convert", "gguf", *flags, str(gguf_path), str(out)]) == 0
        cfg = json.loads((out / "config.json").read_text())
        assert ("quantization_config" in cfg) == quantized
    assert "wrote" in capsys.readouterr().out
