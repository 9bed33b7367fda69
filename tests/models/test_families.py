"""Every supported family against transformers: prefill logits, cached decode, and greedy generation."""

import pytest
import torch

from strata.layers.attention import AttentionMetadata
from strata.layers.kv_cache import allocate_kv_caches
from strata.weights.loader import load_model
from tests.models.conftest import FAMILIES
from tests.models.paged_decode import assert_cached_decode_equals_full

SEQ = 40  # longer than mistral's sliding window (24)


def _ids(vocab: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_logits_match_transformers(hf_family, family):
    hf, path = hf_family(family)
    ours = load_model(path, progress=False)
    ids = _ids(hf.config.vocab_size, SEQ)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()  # [T, V]
    got = ours(ids, torch.arange(SEQ), AttentionMetadata.no_cache([SEQ]))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_decode_equals_full_forward(hf_family, family):
    _, path = hf_family(family)
    model = load_model(path, progress=False)
    cfg = model.config
    caches = allocate_kv_caches(model.kv_cache_spec(), 64, torch.float32)
    assert_cached_decode_equals_full(model, _ids(cfg.vocab_size, SEQ, seed=2), caches, torch.arange(64), prefill=17)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_matches_transformers(hf_family, family):
    from strata import LLM, SamplingParams

    hf, path = hf_family(family)
    prompt = _ids(hf.config.vocab_size, 7, seed=3)
    with torch.no_grad():
        ref = hf.generate(prompt[None], max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0, min_new_tokens=32)[0, 7:].tolist()
    llm = LLM(path, progress=False)
    out = llm.generate([prompt.tolist()], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sharded_half_precision_checkpoint(tmp_path, dtype):
    from tests.models.conftest import build_hf

    hf = build_hf("mixtral", tmp_path / "full", dtype=dtype)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours = load_model(str(tmp_path / "sharded"), progress=False)  # dtype auto = the checkpoint's
    assert ours.lm_head.weight.dtype == dtype
    ids = _ids(hf.config.vocab_size, 12)
    with torch.no_grad():
        ref = hf.float()(ids[None]).logits[0]
    got = load_model(str(tmp_path / "sharded"), dtype="float32", progress=False)(
        ids, torch.arange(12), AttentionMetadata.no_cache([12]))
    torch.testing.assert_close(got, ref, atol=5e-4, rtol=1e-3)  # same half-precision weights, fp32 compute
    half = ours(ids, torch.arange(12), AttentionMetadata.no_cache([12]))
    assert (half.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


@pytest.mark.parametrize("family", list(FAMILIES))
def test_param_counts_match_transformers(hf_family, family):
    from strata.models.registry import load_config

    hf, path = hf_family(family)
    total = load_config(path).param_counts()["total"]
    assert total == sum(p.numel() for p in hf.parameters())
