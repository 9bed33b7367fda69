"""GGUF files of every supported architecture, written from tiny random HF checkpoints the way llama.cpp lays
them out, converted by Strata and compared with transformers (on the original checkpoint, and on the same
GGUF where transformers reads it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strata.layers.attention import AttentionMetadata
from strata.weights.gguf_convert import convert_gguf
from strata.weights.loader import load_model
from tests.models.conftest import COMMON
from tests.weights.conftest import FAMILIES
from tests.weights.gguf_writer import write_gguf

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

SEQ = 24


def _ids(n: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, COMMON["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed))


def _strata_logits(folder, ids):
    model = load_model(str(folder), progress=False)
    return model(ids, torch.arange(len(ids)), AttentionMetadata.no_cache([len(ids)]))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_f32_gguf_equals_original_checkpoint(hf_models, tmp_path, family):
    hf, path = hf_models(family)
    gguf_path = write_gguf(path, tmp_path / "m.gguf")
    out = convert_gguf(gguf_path, tmp_path / "hf")
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    torch.testing.assert_close(_strata_logits(out, ids), ref, atol=1e-4, rtol=1e-4)


def test_mixtral_split_expert_tensors(hf_models, tmp_path):
    hf, path = hf_models("mixtral")
    gguf_path = write_gguf(path, tmp_path / "m.gguf", merged_experts=False)
    import gguf

    assert "blk.0.ffn_gate.3.weight" in {t.name for t in gguf.GGUFReader(str(gguf_path)).tensors}
    out = convert_gguf(gguf_path, tmp_path / "hf")
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    torch.testing.assert_close(_strata_logits(out, ids), ref, atol=1e-4, rtol=1e-4)


# transformers' GGUF loader reads no rope scaling, no expert sizes or dense layers of the Qwen MoEs, and has
# no mixtral/olmoe: the families compared on the same file are those it reads whole
@pytest.mark.parametrize("family,qtype", [("llama", "Q8_0"), ("llama", "Q4_0"), ("llama", "Q4_1"),
                                          ("mistral", "Q8_0")])
def test_quantized_gguf_equals_transformers_on_the_same_file(hf_models, tmp_path, family, qtype):
    _, path = hf_models(family)
    gguf_path = write_gguf(path, tmp_path / "m.gguf", qtype=qtype)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                                  dtype=torch.float32).eval()
    out = convert_gguf(gguf_path, tmp_path / "hf")
    ids = _ids()
    with torch.no_grad():
        ref = ref_model(ids[None]).logits[0]
    torch.testing.assert_close(_strata_logits(out, ids), ref, atol=1e-4, rtol=1e-4)
    # the transformers folder view agrees too: the converted folder is a plain HF checkpoint
    folder_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(folder_model(ids[None]).logits[0], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,qtype", [("mixtral", "Q8_0"), ("qwen2_moe", "Q8_0"), ("qwen3_moe", "Q4_1"),
                                          ("olmoe", "Q4_0")])
def test_quantized_moe_gguf(hf_models, tmp_path, family, qtype):
    """Where transformers cannot read the GGUF: it reads the converted folder, and Q8_0 stays near the original."""
    hf, path = hf_models(family)
    out = convert_gguf(write_gguf(path, tmp_path / "m.gguf", qtype=qtype), tmp_path / "hf")
    folder_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        ref, original = folder_model(ids[None]).logits[0], hf(ids[None]).logits[0]
    got = _strata_logits(out, ids)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert not torch.equal(got, original)  # the quantization happened
    if qtype == "Q8_0":
        torch.testing.assert_close(got, original, atol=0.05, rtol=0.05)


def test_bf16_exact_weights_stay_bfloat16(hf_models, tmp_path):
    _, path = hf_models("llama")

    def to_bf16_grid(named):  # values that bfloat16 holds exactly, stored as F32 in the file
        return {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in named.items()}

    gguf_path = write_gguf(path, tmp_path / "m.gguf", tensors=to_bf16_grid)
    out = convert_gguf(gguf_path, tmp_path / "hf")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 - safe_open is not iterable
    assert '"torch_dtype": "bfloat16"' in (out / "config.json").read_text()


def test_tokenizer_and_chat_template_match_transformers(hf_models, tmp_path):
    _, path = hf_models("qwen2")
    write_gguf(path, tmp_path / "m.gguf")
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    from strata.tokenizer import Tokenizer

    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    ours = Tokenizer(str(out))
    for text in ["the quick brown fox", "héllo wörld 漢字", "  spaced\n\nlines ", "<s>the</s> dog", ""]:
        assert ours.encode(text) == ref(text).input_ids, text
    msgs = [{"role": "user", "content": "the fox"}]
    assert ours.apply_chat_template(msgs, True) == ref.apply_chat_template(msgs, tokenize=False,
                                                                           add_generation_prompt=True)


def test_sentencepiece_vocabulary_matches_transformers(tmp_path):
    """A llama (SentencePiece) vocabulary with scores and no merges: stories260K's tok512.model."""
    from tests.conftest import STORIES260K

    model_file = STORIES260K / "tok512.model"
    if not model_file.is_file():
        pytest.skip(f"{model_file} not available")
    import gguf

    from strata.weights.gguf_reader import GGUFFile
    from strata.weights.gguf_tokenizer import build_tokenizer
    from strata.weights.sp_tokenizer import read_sp_model

    vocab = read_sp_model(model_file)
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in vocab.pieces])
    w.add_token_scores([p.score for p in vocab.pieces])
    w.add_token_types([p.kind for p in vocab.pieces])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(vocab.pieces), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok, _ = build_tokenizer(GGUFFile(tmp_path / "t.gguf"))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    for text in ["Once upon a time, there was a little girl.", "  two  spaces", "Lily's café ünïcode 漢", "x"]:
        assert tok.encode(text).ids == ref(text).input_ids, text
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == ref.decode(ref(text).input_ids,
                                                                                        skip_special_tokens=True)


KEPT = {"Q4_0": "int4-g32", "Q8_0": "q8_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1"}


@pytest.mark.parametrize("family,qtype", [("llama", "Q5_0"), ("mixtral", "Q5_1")])
def test_q5_gguf_decodes_natively(hf_models, tmp_path, monkeypatch, family, qtype):
    """LLM("m.gguf") keeps Q5_0 / Q5_1 blocks, the one-call native decoder runs over them (dense projections and
    experts) and gives the per-op path's tokens."""
    from strata.layers.linear import bf16_lib
    from tests.models.test_native_decode import _greedy

    if bf16_lib() is None:
        pytest.skip("native kernels unavailable on this machine")
    _, path = hf_models(family)
    gguf_path = write_gguf(path, tmp_path / "m.gguf", qtype=qtype)
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path / "cache"))
    native, calls = _greedy(gguf_path, monkeypatch, native=True)
    assert calls > 0
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path / "cache"))
    reference, _ = _greedy(gguf_path, monkeypatch, native=False)
    assert native == reference


@pytest.mark.parametrize("family,qtype", [("llama", "Q4_0"), ("mixtral", "Q4_0"), ("llama", "Q8_0"),
                                          ("llama", "Q4_1"), ("mixtral", "Q4_1"), ("llama", "Q5_0"),
                                          ("mixtral", "Q5_0"), ("llama", "Q5_1"), ("mixtral", "Q5_1")])
def test_kept_quantized_holds_the_same_values(hf_models, tmp_path, family, qtype):
    """--keep-quantized: Q4_0 projections become int4-g32 codes and scales, Q8_0, Q4_1, Q5_0 and Q5_1 stay as
    their blocks; either way they dequantize to exactly the float conversion's weights (llama: through the q/k
    row reorder and the tied embedding table kept quantized and read by the head; mixtral: merged experts)."""
    import json

    from safetensors.torch import load_file

    from strata.cli import main
    from strata.quant.format import dequantize_weight

    _, path = hf_models(family)
    gguf_path = write_gguf(path, tmp_path / "m.gguf", qtype=qtype)
    floats = convert_gguf(gguf_path, tmp_path / "f")
    assert main(["convert", "gguf", "--keep-quantized", str(gguf_path), str(tmp_path / "q")]) == 0
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    modules = cfg["quantization_config"]["modules"]
    assert "model.layers.0.self_attn.q_proj" in modules and set(modules.values()) == {KEPT[qtype]}
    tied = json.loads((floats / "config.json").read_text())["tie_word_embeddings"]
    # the embedding table stays quantized; a tied head reads it (no lm_head tensor), an untied one is its own
    assert "model.embed_tokens" in modules and ("lm_head" in modules) == (not tied)
    assert cfg["tie_word_embeddings"] == tied
    f, q = load_file(str(floats / "model.safetensors")), load_file(str(tmp_path / "q" / "model.safetensors"))
    for m, fmt in modules.items():
        w = f[f"{m}.weight"].float()
        got = dequantize_weight({k: q[f"{m}.{k}"] for k in ("qweight", "scales") if f"{m}.{k}" in q}, fmt, *w.shape)
        assert torch.equal(got, w), m
    ids = _ids()
    exact, kept = _strata_logits(floats, ids), _strata_logits(tmp_path / "q", ids)
    if qtype == "Q4_0":  # int4-g32 runs bf16 activations
        torch.testing.assert_close(kept, exact, atol=0.05 * exact.abs().max().item(), rtol=0)
        assert (kept.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9
    else:  # q8_0 / q4_1 / q5_0 / q5_1 compute in float32 for a float32 model
        torch.testing.assert_close(kept, exact, atol=1e-4, rtol=1e-4)
