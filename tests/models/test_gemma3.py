"""Gemma 3 text against transformers on a tiny random config: prefill logits, paged decode of several
sequences past the sliding window, greedy generation, and the config checks."""

import json
from pathlib import Path

import pytest
import torch

from strata.errors import StrataError
from strata.layers.attention import AttentionMetadata
from strata.weights.loader import load_model
from tests.models.conftest import save_tiny_tokenizer
from tests.models.paged_decode import assert_paged_decode_matches, paged_logits, random_ids

transformers = pytest.importorskip("transformers")

WINDOW = 8
CONFIG = dict(  # noqa: C408 (HF keyword names, as tests/models/conftest.py)
    vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1,
    eos_token_id=2, pad_token_id=0, sliding_window=WINDOW, query_pre_attn_scalar=24,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    final_logit_softcapping=5.0,
)


def build(path, seed: int = 0, **overrides):
    cfg = transformers.Gemma3TextConfig(**{**CONFIG, **overrides})
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # spread logits; norm weights off zero so (1 + weight) is exercised
        for name, p in model.named_parameters():
            p.normal_(0, 0.08 if p.ndim == 2 else 0.3)
    model.save_pretrained(path)
    save_tiny_tokenizer(path)
    return model


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3")
    return build(path), str(path)


def _ids(n: int, seed: int) -> torch.Tensor:
    return random_ids(CONFIG["vocab_size"], n, seed)


def test_prefill_logits_match_transformers(gemma):
    hf, path = gemma
    ours = load_model(path, progress=False)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied by default, as Gemma
    ids = _ids(40, 1)  # 5x the window
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]  # [T, V]
    got = ours(ids, torch.arange(40), AttentionMetadata.no_cache([40]))
    assert got.abs().max() <= 5.0  # the softcap applies
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_paged_batched_decode_past_window_matches_transformers(gemma):
    hf, path = gemma
    model = load_model(path, progress=False)
    assert [s.sliding_window for s in model.kv_cache_spec()] == [WINDOW, WINDOW, None, WINDOW]
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [WINDOW, WINDOW, None, WINDOW]
    assert_paged_decode_matches(model, hf, CONFIG["vocab_size"])  # 8 blocks per sequence, 3 sequences per step


def test_greedy_generation_matches_transformers(gemma):
    from strata import LLM, SamplingParams

    hf, path = gemma
    prompts = [_ids(n, 5 + n) for n in (7, 12)]
    llm = LLM(path, progress=False, block_size=4)
    outs = llm.generate([p.tolist() for p in prompts], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(p[None], max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0,
                              min_new_tokens=24)[0, len(p):].tolist()
        assert out.outputs[0].token_ids == ref


def test_bf16_decode_agrees_with_float32(gemma):
    _, path = gemma
    ref = load_model(path, progress=False)
    half = load_model(path, dtype="bfloat16", progress=False)
    seqs = [_ids(24, 9)]
    a = paged_logits(ref, seqs, [6])[0]
    b = paged_logits(half, seqs, [6], dtype=torch.bfloat16)[0]
    assert (a.argmax(-1) == b.float().argmax(-1)).float().mean() > 0.8


@pytest.mark.parametrize("field, value", [("attn_logit_softcapping", 50.0), ("use_bidirectional_attention", True),
                                          ("hidden_activation", "relu")])
def test_unsupported_settings_are_refused(gemma, tmp_path, field, value):
    _, path = gemma
    d = json.loads(Path(path, "config.json").read_text())
    d[field] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(StrataError, match=field):
        load_model(str(tmp_path), progress=False)


def test_param_counts_match_transformers(gemma):
    from strata.models.registry import load_config

    hf, path = gemma
    assert load_config(path).param_counts()["total"] == sum(p.numel() for p in hf.parameters())


def test_legacy_config_keys(gemma, tmp_path):
    """Hub configs of transformers 4: rope_theta + rope_scaling + rope_local_base_freq, sliding_window_pattern."""
    from strata.models.gemma3 import Gemma3TextConfig

    _, path = gemma
    d = json.loads(Path(path, "config.json").read_text())
    d.pop("layer_types"), d.pop("rope_parameters")
    d.update(rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_local_base_freq=1e4,
             sliding_window_pattern=3)
    args = Gemma3TextConfig.from_hf(d)
    assert args.layer_types == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert (args.rope_theta, args.rope_local_base_freq, args.rope_scaling["factor"]) == (1e6, 1e4, 2.0)


def test_gguf_from_llama_cpp_converter_matches_transformers(tmp_path):
    """llama.cpp's converter writes norms as 1 + weight, a fixed sliding pattern (every 6th layer global) and no
    query_pre_attn_scalar (it scales by head_dim): a checkpoint that fits those rules converts exactly."""
    from strata import LLM, SamplingParams
    from strata.weights.gguf_convert import convert_gguf
    from tests.models.llama_cpp_convert import convert_to_gguf

    # 303 rows: the converter keeps len(vocab) + len(added_tokens) of tokenizer.json, which the plain tokenizer
    # class (not Gemma's, which would add its own special tokens) reports as they are
    hf = build(tmp_path / "hf", seed=3, vocab_size=303, num_hidden_layers=7, layer_types=None,
               query_pre_attn_scalar=16)
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    assert hf.config.layer_types[5] == "full_attention" and hf.config.layer_types[6] == "sliding_attention"
    gguf_file = convert_to_gguf(tmp_path / "hf", tmp_path / "tiny.gguf")
    ours = load_model(str(convert_gguf(gguf_file, tmp_path / "back")), progress=False)
    ids = _ids(30, 6) % 303
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    torch.testing.assert_close(ours(ids, torch.arange(30), AttentionMetadata.no_cache([30])), ref, atol=1e-4, rtol=1e-4)
    prompt = ids[:9]
    with torch.no_grad():
        want = hf.generate(prompt[None], max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0,
                           min_new_tokens=16)[0, 9:].tolist()
    got = LLM(str(gguf_file), progress=False).generate([prompt.tolist()], SamplingParams(temperature=0, max_tokens=16,
                                                                                         ignore_eos=True))
    assert got[0].outputs[0].token_ids == want


def test_tensor_parallel_is_refused_in_one_line(gemma):
    from strata.distributed.tensor_parallel import check_supported
    from strata.errors import UnsupportedError
    from strata.models.registry import load_config

    _, path = gemma
    with pytest.raises(UnsupportedError, match="does not support"):
        check_supported(load_config(path), 2, path)
