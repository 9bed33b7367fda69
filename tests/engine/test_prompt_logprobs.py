"""Prompt logprobs from the prefill forward: equal to transformers' log-softmax over the same prompt, whatever
the chunking (chunked prefill, logits a slice at a time), the prefix cache or n > 1; the first token has none."""

import pytest
import torch

from strata.config import EngineConfig
from strata.engine import llm_engine
from strata.engine.llm_engine import LLMEngine
from strata.engine.sampling_params import SamplingParams

pytest.importorskip("transformers")

PROMPT = list(range(3, 60))  # 57 tokens: several KV blocks and, at a 16-token budget, four prefill chunks


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    from tests.models.conftest import build_hf

    path = tmp_path_factory.mktemp("qwen3_moe")
    return build_hf("qwen3_moe", path), str(path)


def _reference(hf_model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt])).logits[0].float()  # [T, V]
    return torch.log_softmax(logits, dim=-1)


def _run(engine: LLMEngine, prompt: list[int], params: SamplingParams):
    rid = engine.add_request(prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


@pytest.mark.parametrize("budget,rows", [(2048, 256), (2048, 8), (16, 256)])
def test_prompt_logprobs_match_transformers(qwen3_moe, budget, rows, monkeypatch):
    monkeypatch.setattr(llm_engine, "PROMPT_LOGPROBS_ROWS", rows)
    hf_model, path = qwen3_moe
    ref = _reference(hf_model, PROMPT)  # [T, V]
    engine = LLMEngine(EngineConfig(model=path, dtype="float32", max_num_batched_tokens=budget), progress=False)
    outs = _run(engine, PROMPT, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3, ignore_eos=True))
    assert all(o.prompt_logprobs is not None for o in outs)  # complete from the first output on
    plp = outs[-1].prompt_logprobs
    assert len(plp) == len(PROMPT) and plp[0] is None
    for pos in range(1, len(PROMPT)):
        entry, row = plp[pos], ref[pos - 1]
        assert entry["token_id"] == PROMPT[pos]
        assert entry["logprob"] == pytest.approx(float(row[PROMPT[pos]]), abs=1e-4)
        assert entry["rank"] == int((row > row[PROMPT[pos]]).sum()) + 1
        assert [t for t, _ in entry["top"]] == torch.topk(row, 3).indices.tolist()


def test_prompt_logprobs_bypass_the_prefix_cache_and_n(qwen3_moe):
    hf_model, path = qwen3_moe
    ref = _reference(hf_model, PROMPT)
    engine = LLMEngine(EngineConfig(model=path, dtype="float32"), progress=False)
    _run(engine, PROMPT, SamplingParams(max_tokens=1, temperature=0))  # fills the prefix cache
    outs = _run(engine, PROMPT, SamplingParams(n=3, max_tokens=2, temperature=1.0, seed=1, prompt_logprobs=0))
    plp = outs[-1].prompt_logprobs
    got = torch.tensor([e["logprob"] for e in plp[1:]])
    want = ref[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
    assert torch.allclose(got, want, atol=1e-4)
    assert all(e["top"] == [] for e in plp[1:])


def test_sampled_logprobs_are_a_snapshot_of_emitted_text(qwen3_moe):
    _, path = qwen3_moe
    engine = LLMEngine(EngineConfig(model=path, dtype="float32"), progress=False)
    outs = _run(engine, PROMPT[:5], SamplingParams(max_tokens=12, temperature=0, logprobs=1, ignore_eos=True))
    for o in outs[:-1]:  # the last one carries every token, a trailing partial character included
        c = o.outputs[0]
        assert len(c.logprobs) <= len(c.token_ids)
        assert engine.tokenizer.decode([e["token_id"] for e in c.logprobs]) == c.text
    assert len(outs[-1].outputs[0].logprobs) == 12
