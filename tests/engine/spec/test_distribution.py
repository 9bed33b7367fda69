"""Sampling through the engine with a draft model: the distribution of generated text is the target's.

6,000 four-token continuations (temperature 1, top-k 2: 16 possible outputs) from the bundled MoE with the
bundled draft proposing 2 tokens after the first (so tokens 2-4 come from one verification: accepted drafts,
a replacement or the bonus token), against the exact distribution computed from the target's logits; seeded.
Sampling noise alone gives a total variation of about 0.02; the draft's own distribution is about 0.6 away."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from strata import LLM
from strata.engine.llm_engine import BUNDLED_MODEL
from strata.engine.sampler import sampling_probs
from strata.engine.sampling_params import SamplingParams
from strata.layers.attention import AttentionMetadata

DRAFT = os.path.join(os.path.dirname(BUNDLED_MODEL), "shakespeare-draft")
pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(DRAFT, "config.json")), reason="bundled models not present"
)
PARAMS = SamplingParams(temperature=1.0, top_k=2, max_tokens=4, ignore_eos=True, n=100)
NUM_REQUESTS = 60
TV_BOUND = 0.06


def _exact(model, prompt: list[int], length: int) -> dict[tuple[int, ...], float]:
    @torch.inference_mode()
    def dist(ids: list[int]) -> torch.Tensor:
        logits = model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.no_cache([len(ids)]))
        p = sampling_probs(logits[-1], PARAMS)  # [V]
        return p / p.sum()

    out: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for seq, prob in out.items():
            p = dist(prompt + list(seq))
            for t in p.nonzero().flatten().tolist():
                nxt[(*seq, t)] = prob * float(p[t])
        out = nxt
    return out


def test_speculative_sampling_keeps_the_targets_distribution():
    torch.manual_seed(0)
    spec = {"model": DRAFT, "num_speculative_tokens": 2}
    llm = LLM(None, progress=False, dtype="float32", max_num_seqs=128, speculative_config=spec)
    prompt = llm.tokenizer.encode("ROMEO:\nBut soft,")
    counts: Counter = Counter()
    for _ in range(NUM_REQUESTS):
        for choice in llm.generate([prompt], PARAMS)[0].outputs:
            counts[tuple(choice.token_ids)] += 1
    stats = llm.engine.spec.stats()
    assert 0 < stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"]  # both branches ran
    exact = _exact(llm.engine.model, prompt, PARAMS.max_tokens)
    n = sum(counts.values())
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - exact.get(k, 0.0)) for k in set(counts) | set(exact))
    assert tv < TV_BOUND
    assert max(exact.values()) < 0.5  # the test is not about one near-certain output
