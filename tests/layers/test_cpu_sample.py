"""The native sampling kernels (strata/layers/cpu_sample.c) against sorting references: top-k and top-p keep
exactly the entries a sort keeps, and the draw picks the token a running sum in plain Python picks."""

import pytest
import torch

from strata.engine.sampler import _native_select, draw
from strata.engine.sampling_params import SamplingParams
from strata.engine.sequence import Sequence
from strata.layers.quant_native import native_lib
from tests.engine.test_sampler import python_draw

pytestmark = pytest.mark.skipif(native_lib() is None, reason="native kernels unavailable on this machine")

VOCABS = [1, 15, 16, 17, 300, 2048, 49153]


def _rows(vocab: int, g: torch.Generator) -> torch.Tensor:
    """Logit rows [6, V] of different shapes: flat, peaked, very peaked, a few ties, integer ties, -inf."""
    rows = [torch.randn(vocab, generator=g) * s for s in (0.5, 3.0, 12.0)]
    rows.append(torch.randint(-3, 3, (vocab,), generator=g).float())  # ties everywhere
    rows.append(torch.randn(vocab, generator=g).round(decimals=1) * 4)  # ties at a coarse grid
    masked = torch.randn(vocab, generator=g) * 2
    masked[torch.rand(vocab, generator=g) < 0.3] = float("-inf")
    masked[0] = 1.0  # at least one finite logit
    rows.append(masked)
    return torch.stack(rows)


def _top_p_reference(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Sort descending (ties by index), keep an entry while the weight before it is at most top_p (float64);
    top_p = 1 is no filter (the sampler never applies it)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs.double(), descending=True, stable=True)
    before = torch.cumsum(sorted_probs, 0) - sorted_probs
    kept = torch.zeros_like(probs, dtype=torch.bool)
    kept[order[before <= top_p]] = True
    return torch.where(kept, probs, torch.zeros_like(probs))


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("top_p", [0.0, 0.1, 0.5, 0.9, 0.95, 0.999, 1.0])
def test_top_p_keeps_what_a_sort_keeps(vocab, top_p):
    g = torch.Generator().manual_seed(vocab)
    probs = torch.softmax(_rows(vocab, g), dim=-1)  # [6, V]
    probs[1, : vocab // 3] = 0.0  # min-p left zeros (and an unnormalized row)
    want = torch.stack([_top_p_reference(row, top_p) for row in probs])
    got = probs.clone()
    assert _native_select(got, 1, [top_p] * got.shape[0], 0.0)
    assert torch.equal(got, want), (got != want).nonzero()[:5].tolist()


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("k", [1, 2, 5, 50, 1000])
def test_top_k_keeps_every_entry_at_or_above_the_kth(vocab, k):
    g = torch.Generator().manual_seed(vocab + k)
    logits = _rows(vocab, g)  # [6, V]
    want = logits.clone()
    if k < vocab:
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # [6, 1]
        want = logits.masked_fill(logits < kth, float("-inf"))
    got = logits.clone()
    assert _native_select(got, 0, [k] * got.shape[0], float("-inf"))
    assert torch.equal(got, want)


def test_rows_without_a_filter_are_left_alone():
    g = torch.Generator().manual_seed(0)
    logits = _rows(64, g)
    got = logits.clone()
    _native_select(got, 0, [0, 3, 0, 64, 65, 2], float("-inf"))  # k = 0, and k >= V: no top-k
    for r in (0, 2, 3, 4):
        assert torch.equal(got[r], logits[r])
    assert int(torch.isfinite(got[1]).sum()) >= 3 and int(torch.isfinite(got[1]).sum()) < 64


@pytest.mark.parametrize("vocab", VOCABS)
def test_draw_picks_the_running_sums_token(vocab, monkeypatch):
    g = torch.Generator().manual_seed(vocab)
    probs = torch.softmax(_rows(vocab, g), dim=-1)  # [6, V]
    probs[1, : vocab // 3] = 0.0
    seqs = [Sequence("r", [0], SamplingParams(), index=0)] * probs.shape[0]
    for trial in range(20):
        u = torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=g)  # [6, 1]
        monkeypatch.setattr(torch, "rand", lambda *a, _u=u, **k: _u.clone())
        got = draw(probs, seqs).tolist()
        assert got == [python_draw(row.double().tolist(), float(x)) for row, x in zip(probs, u[:, 0])]


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf")])
def test_draw_refuses_invalid_weights(bad):
    probs = torch.full((3, 40), 0.025)
    probs[2, 7] = bad
    with pytest.raises(ValueError, match="invalid sampling distribution"):
        draw(probs, [Sequence("r", [0], SamplingParams(), index=0)] * 3)
    with pytest.raises(ValueError, match="invalid sampling distribution"):
        draw(torch.zeros(1, 40), [Sequence("r", [0], SamplingParams(), index=0)])
