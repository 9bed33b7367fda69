"""Sampler rules on hand-made logits: each filter keeps exactly the tokens it should."""

import pytest
import torch

from strata.engine.sampler import Sampler, argmax_rows, draw, process_logits, sample_token
from strata.engine.sampling_params import MAX_PENALTY, MIN_TEMPERATURE, SamplingParams
from strata.engine.sequence import Sequence
from strata.errors import InvalidRequestError, WeightsError
from strata.layers.quant_native import native_lib

LOGITS = torch.log(torch.tensor([0.05, 0.40, 0.30, 0.15, 0.10]))


def _seq(**kw) -> Sequence:
    return Sequence("r", [0, 3], SamplingParams(seed=0, **kw))


def _support(**kw) -> set[int]:
    seq = _seq(**kw)
    return {sample_token(process_logits(LOGITS, seq, [4]), seq) for _ in range(300)}


def test_filters_keep_the_right_tokens():
    assert _support(temperature=1.0) == {0, 1, 2, 3, 4}
    assert _support(temperature=1.0, top_k=2) == {1, 2}
    assert _support(temperature=1.0, top_p=0.65) == {1, 2}  # 0.40 + 0.30 reaches 0.65
    assert _support(temperature=1.0, top_p=0.3) == {1}
    assert _support(temperature=1.0, min_p=0.5) == {1, 2}  # p >= 0.5 * 0.40
    assert _support(temperature=0.0) == {1}


def test_penalties_and_bias():
    seq = _seq(temperature=0.0, repetition_penalty=10.0)  # prompt has tokens 0 and 3
    out = process_logits(LOGITS, seq, [4])
    assert out[3] < LOGITS[3] and out[0] < LOGITS[0] and out[1] == LOGITS[1]
    seq = _seq(temperature=0.0, logit_bias={4: 100.0})
    assert sample_token(process_logits(LOGITS, seq, [4]), seq) == 4
    seq = _seq(temperature=0.0, frequency_penalty=2.0)
    seq.token_ids += [1, 1]
    assert sample_token(process_logits(LOGITS, seq, [4]), seq) == 2


def test_min_tokens_bans_eos():
    seq = _seq(temperature=0.0, min_tokens=2, logit_bias={4: 100.0})
    assert sample_token(process_logits(LOGITS, seq, [4]), seq) != 4


def test_seeded_sampling_is_reproducible_and_batch_independent():
    logits = torch.randn(3, 50)
    a = [_seq(temperature=1.0) for _ in range(3)]
    b = [_seq(temperature=1.0) for _ in range(3)]
    sampler = Sampler([])
    first = [sampler(logits, a) for _ in range(5)]
    second = [sampler(logits[1:2], [b[1]]) for _ in range(5)]
    assert [f[1] for f in first] == [s[0] for s in second]


@pytest.mark.parametrize("field,value", [
    ("temperature", 1e-45), ("temperature", 1e-300), ("temperature", float("nan")), ("temperature", float("inf")),
    ("repetition_penalty", 1e-300), ("repetition_penalty", float("nan")), ("top_p", float("nan")),
    ("min_p", float("nan")), ("presence_penalty", float("inf")), ("logit_bias", {3: float("nan")}),
])
def test_values_that_would_give_nan_probabilities_are_refused(field, value):
    with pytest.raises(InvalidRequestError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


def test_smallest_allowed_values_sample_finite_tokens():
    """At the edges of the ranges the processed logits stay finite, so sampling never sees NaN."""
    seq = Sequence("r", [0, 1, 2, 3], SamplingParams(seed=0, temperature=MIN_TEMPERATURE,
                                                     repetition_penalty=1 / MAX_PENALTY))
    logits = process_logits(LOGITS * 1e4, seq, [4])  # large negative logits; the seen ones shrink 100-fold
    assert torch.isfinite(logits).all()
    assert sample_token(logits, seq) == 1  # the most likely token, by a margin a temperature of 0.01 keeps


def test_nan_logits_are_refused_not_sampled():
    logits = torch.stack([LOGITS, LOGITS.clone().index_fill_(0, torch.tensor([2]), float("nan"))])  # [2, V]
    with pytest.raises(WeightsError, match="NaN/inf logits"):
        Sampler([4])(logits, [_seq(temperature=0.0), _seq(temperature=0.0)])


@pytest.mark.parametrize("vocab", [1, 17, 2048, 49153])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("greedy", [True, False])
def test_every_nonfinite_logit_is_refused(vocab, bad, greedy):
    """Whichever row and position holds it (the last entry of a row too: the native scan's masked tail), a NaN
    or +-inf logit stops the step, greedy (checked inside the argmax scan) or sampled."""
    g = torch.Generator().manual_seed(vocab)
    for row, pos in ((0, 0), (2, vocab - 1), (1, vocab // 2)):
        logits = torch.randn(3, vocab, generator=g)
        logits[row, pos] = bad
        seqs = [_seq(temperature=0.0 if greedy else 0.8) for _ in range(3)]
        with pytest.raises(WeightsError, match="NaN/inf logits"):
            Sampler([0])(logits, seqs)
    assert argmax_rows(torch.randn(3, vocab, generator=g), finite_check=True) is not None


MIXED = [{"temperature": 0.0}, {"temperature": 0.8, "top_k": 5}, {"temperature": 1.3, "top_p": 0.7},
         {"temperature": 0.6, "min_p": 0.1}, {"temperature": 1.0, "top_k": 20, "top_p": 0.9, "min_p": 0.02},
         {"temperature": 0.9, "repetition_penalty": 1.3, "presence_penalty": 0.5},
         {"temperature": 0.0, "logit_bias": {3: 2.0}}, {"temperature": 1.1, "min_tokens": 3, "frequency_penalty": 0.4},
         {"temperature": 0.7}]


def _mixed_batch(seeded: bool) -> list[Sequence]:
    return [Sequence("r", [0, 3, 9], SamplingParams(seed=(7 * i if seeded else None), **kw), index=0)
            for i, kw in enumerate(MIXED)]


def _reference_token(logits: torch.Tensor, seq: Sequence) -> int:
    """One row as the sampler did it before it sampled whole batches: processors, temperature, top-k, softmax,
    min-p, top-p, then one uniform from the row's generator walked along the weights in plain Python."""
    p = seq.params
    logits = process_logits(logits, seq, [4])
    if p.is_greedy:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if p.top_k and 0 < p.top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < torch.topk(logits, p.top_k).values[-1:], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.amax(-1, keepdim=True), 0.0)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        sorted_probs = sorted_probs.masked_fill((cum - sorted_probs) > p.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    u = float(torch.rand(1, dtype=torch.float64, generator=seq.generator))
    return python_draw(probs.double().tolist(), u)


def python_draw(weights: list[float], u: float) -> int:
    """The first token whose running sum of weights exceeds u x their total, in plain Python (the last token of
    positive weight when rounding leaves the target at the total)."""
    target, acc = u * sum(weights), 0.0
    for tok, w in enumerate(weights):
        acc += w
        if w > 0 and acc > target:
            return tok
    return max(t for t, w in enumerate(weights) if w > 0)


@pytest.mark.parametrize("seeded", [True, False])
def test_batched_sampling_equals_one_draw_per_row(seeded):
    """The whole-batch sampler picks the tokens that the per-row reference (one uniform per row from the row's
    generator) picks, for a batch of mixed parameters over many steps; unseeded rows draw
    from the global generator in the same order."""
    torch.manual_seed(1)
    steps = [torch.randn(len(MIXED), 300) * 3 for _ in range(12)]  # [N, V] per step
    batch, ref = _mixed_batch(seeded), _mixed_batch(seeded)
    sampler = Sampler([4])
    torch.manual_seed(2)
    got = []
    for logits in steps:
        toks = sampler(logits, batch)
        for seq, t in zip(batch, toks):
            seq.token_ids.append(t)
        got.append(toks)
    torch.manual_seed(2)
    want = []
    for logits in steps:
        toks = [_reference_token(row, seq) for row, seq in zip(logits, ref)]
        for seq, t in zip(ref, toks):
            seq.token_ids.append(t)
        want.append(toks)
    assert got == want
    assert len({tuple(g[1:]) for g in got}) > 1  # the sampled rows did vary


def test_draw_frequencies_follow_the_weights():
    """20,000 draws of one row land on each token as often as its weight says (within 4 sigma), and never on a
    token of weight zero, with the weights unnormalized (as top-p leaves them)."""
    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.5, 0.0, 2.5, 0.0])  # total 7
    n = 20_000
    torch.manual_seed(3)
    got = draw(weights.expand(n, -1), [Sequence("r", [0], SamplingParams(), index=0)] * n)
    counts = torch.bincount(got, minlength=8).double()
    p = weights.double() / weights.sum()
    assert counts[p == 0].sum() == 0
    sigma = (n * p * (1 - p)).sqrt()
    assert bool(((counts - n * p).abs() <= 4 * sigma + 1e-9).all()), counts.tolist()


def test_draw_at_the_ends_of_the_unit_interval(monkeypatch):
    """u = 0 takes the first token of positive weight, and u x total rounded up to the total (u = 1 here) the
    last one, never a zero-weight token before or after them."""
    weights = torch.tensor([[0.0, 0.0, 1e-3, 5.0, 1e-3, 0.0, 0.0]])
    seq = [Sequence("r", [0], SamplingParams(), index=0)]
    for u, want in ((0.0, 2), (1.0, 4)):
        monkeypatch.setattr(torch, "rand", lambda *a, _u=u, **k: torch.full((1, 1), _u, dtype=torch.float64))
        assert int(draw(weights, seq)[0]) == want


@pytest.mark.skipif(native_lib() is None, reason="native kernels unavailable on this machine")
@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 2048, 49153])
def test_greedy_argmax_is_torchs_first_largest(vocab):
    g = torch.Generator().manual_seed(vocab)
    rows = [
        torch.randn(vocab, generator=g),
        torch.randint(-2, 2, (vocab,), generator=g).float(),  # ties everywhere: the first one wins
        torch.full((vocab,), float("-inf")),  # nothing but -inf: index 0
        torch.cat([torch.full((vocab - 1,), float("-inf")), torch.tensor([-1e30])]),  # only the last is finite
    ]
    logits = torch.stack(rows * 5)  # [20, V]: more rows than one block of lanes
    assert argmax_rows(logits) == torch.argmax(logits, dim=-1).tolist()
    assert argmax_rows(logits[:1]) == torch.argmax(logits[:1], dim=-1).tolist()
