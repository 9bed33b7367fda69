"""Speculative decoding in the engine: greedy output identical to plain decoding (draft model on the bundled
MoE, prompt lookup on a tiny random Llama), continuous batching with mixed sampling, stop conditions, and
every KV block back in the pool (target's and draft's) after the requests finish."""

from __future__ import annotations

import os

import pytest

from strata import LLM
from strata.engine.llm_engine import BUNDLED_MODEL
from strata.engine.sampling_params import SamplingParams

DRAFT = os.path.join(os.path.dirname(BUNDLED_MODEL), "shakespeare-draft")
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
# float32: the verification forward (several rows per sequence) rounds like the one-row decode kernels only
# in float32; bf16 greedy paths can part at near-ties, as they already do between batch sizes.
DTYPE = "float32"
needs_bundled = pytest.mark.skipif(
    not os.path.exists(os.path.join(DRAFT, "config.json")), reason="bundled models not present"
)
SHAKESPEARE = [
    "ROMEO:\nBut soft, what light through yonder window breaks?",
    "JULIET:\nO Romeo, Romeo",
    "KING HENRY:\nOnce more unto the breach, dear friends, once more;",
]


def _ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def _check_pools_empty(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    draft = getattr(llm.engine.spec.proposer, "block_manager", None)
    if draft is not None:
        assert draft.num_free_blocks == draft.num_blocks and not llm.engine.spec.proposer.shadows


@pytest.fixture(scope="module")
def plain_moe():
    return LLM(None, progress=False, dtype=DTYPE)


@needs_bundled
@pytest.mark.parametrize("k", [1, 4, 7])
def test_draft_model_greedy_matches_plain_decoding(plain_moe, k):
    ref = _ids(plain_moe.generate(SHAKESPEARE, GREEDY))
    llm = LLM(
        None, progress=False, dtype=DTYPE, speculative_config={"model": DRAFT, "num_speculative_tokens": k}
    )
    assert _ids(llm.generate(SHAKESPEARE, GREEDY)) == ref
    stats = llm.engine.spec.stats()
    assert stats["spec_num_draft_tokens"] > 0 and 0 < stats["spec_acceptance_rate"] <= 1
    _check_pools_empty(llm)


@needs_bundled
def test_mixed_batch_and_stop_conditions(plain_moe):
    """Greedy, sampled, penalized (not speculated) and short requests share steps; limits hold exactly."""
    params = [
        GREEDY,
        SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=30),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=20),
        SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
    ]
    prompts = SHAKESPEARE + [SHAKESPEARE[0]]
    ref = plain_moe.generate(prompts, params)
    llm = LLM(
        None, progress=False, dtype=DTYPE, speculative_config={"model": DRAFT, "num_speculative_tokens": 5}
    )
    out = llm.generate(prompts, params)
    for i in (0, 2, 3):  # greedy: identical, whatever else is in the batch
        assert out[i].outputs[0].token_ids == ref[i].outputs[0].token_ids
    assert len(out[3].outputs[0].token_ids) == 3
    assert len(out[1].outputs[0].token_ids) <= 30
    again = LLM(
        None, progress=False, dtype=DTYPE, speculative_config={"model": DRAFT, "num_speculative_tokens": 5}
    )
    assert _ids(again.generate(prompts, params)) == _ids(out)  # a seed reproduces speculative sampling too
    _check_pools_empty(llm)


@needs_bundled
def test_streaming_sees_every_accepted_token(plain_moe):
    ref = plain_moe.generate([SHAKESPEARE[1]], GREEDY)[0].outputs[0].text
    llm = LLM(
        None, progress=False, dtype=DTYPE, speculative_config={"model": DRAFT, "num_speculative_tokens": 4}
    )
    assert "".join(llm.stream(SHAKESPEARE[1], GREEDY)) == ref
    _check_pools_empty(llm)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.models.conftest import build_hf

    path = tmp_path_factory.mktemp("llama")
    build_hf("llama", path)
    return str(path)


REPETITIVE = [
    [1] + [40, 41, 42, 43, 44, 45] * 6,
    [1] + list(range(100, 130)) * 2 + [100, 101],
    [1, 7, 8, 9, 7, 8, 9, 7, 8],
]


@pytest.mark.parametrize("k,max_n", [(3, 4), (8, 2)])
def test_ngram_greedy_matches_plain_decoding(tiny_llama, k, max_n):
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    ref = _ids(LLM(tiny_llama, progress=False, dtype=DTYPE).generate(REPETITIVE, params))
    spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": max_n}
    llm = LLM(tiny_llama, progress=False, dtype=DTYPE, speculative_config=spec, block_size=4)
    assert _ids(llm.generate(REPETITIVE, params)) == ref
    assert llm.engine.spec.stats()["spec_num_drafts"] > 0
    _check_pools_empty(llm)


def ngram_llm(path) -> LLM:
    return LLM(path, progress=False, dtype=DTYPE, block_size=4,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4})


def test_ngram_with_prefix_caching_and_n_greater_than_one(tiny_llama):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, n=2)
    prompt = REPETITIVE[0]
    ref = LLM(tiny_llama, progress=False, dtype=DTYPE, block_size=4).generate([prompt, prompt], params)
    llm = ngram_llm(tiny_llama)
    out = llm.generate([prompt, prompt], params)
    assert [[c.token_ids for c in o.outputs] for o in out] == [[c.token_ids for c in o.outputs] for o in ref]
    assert llm.engine.block_manager.num_prefix_hits > 0
    _check_pools_empty(llm)


def test_abort_releases_everything(tiny_llama):
    llm = ngram_llm(tiny_llama)
    rid = llm.engine.add_request(
        REPETITIVE[0], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    )
    bm = llm.engine.block_manager
    for _ in range(6):
        llm.engine.step()
        for seq in llm.engine.scheduler.running:  # a rejected tail holds no block past the sequence
            # (the last token, not computed yet, gets its slot when the next step schedules it)
            assert bm.blocks_needed(seq.num_computed_tokens) <= len(seq.block_table) <= bm.blocks_needed(seq.num_tokens)
    assert llm.engine.spec.num_accepted_tokens > 0
    llm.engine.abort_request(rid)
    assert not llm.engine.has_unfinished_requests()
    _check_pools_empty(llm)


@needs_bundled
def test_adaptive_k_keeps_greedy_output(plain_moe):
    ref = _ids(plain_moe.generate(SHAKESPEARE, GREEDY))
    spec = {"model": DRAFT, "num_speculative_tokens": 8, "adaptive": True}
    llm = LLM(None, progress=False, dtype=DTYPE, speculative_config=spec)
    assert _ids(llm.generate(SHAKESPEARE, GREEDY)) == ref
    assert llm.engine.spec.num_drafts > 0 and not llm.engine.spec.policy.rate  # per-sequence state released
    _check_pools_empty(llm)
