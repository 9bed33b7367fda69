"""The native sampling kernels (strata/layers/cpu_sample.c) against sorting references: top-k and top-p keep
exactly the entries a sort keeps, the draw picks the token a running sum in plain Python picks, and the
temperature softmax gives torch's `softmax(x / t)`."""

import pytest
import torch

from strata.engine.sampler import _native_select, _native_softmax, batch_sampling_probs, draw
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


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("with_temps", [True, False])
def test_softmax_is_torchs(vocab, with_temps):
    """softmax(x / t) against torch's in float64: the same to fp32 rounding (the kernel's exp and sum order
    differ in the last bits); entries of -inf give exactly 0, and each row sums to 1."""
    g = torch.Generator().manual_seed(vocab)
    x = _rows(vocab, g)  # [6, V]
    temps = torch.tensor([0.3, 0.7, 1.0, 1.5, 2.0, 0.05]) if with_temps else None
    out = _native_softmax(x, temps)
    ref = torch.softmax(x.double() / (1.0 if temps is None else temps.double()[:, None]), dim=-1)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-9)
    assert torch.equal(out[x == float("-inf")], torch.zeros_like(out[x == float("-inf")]))
    assert torch.allclose(out.double().sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-5)


def test_softmax_of_rows_without_a_finite_maximum_is_nan():
    """Every entry -inf, or x / t overflowing: NaN, as torch's softmax, which the draw then refuses."""
    x = torch.tensor([[float("-inf")] * 5, [1e38, 0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    out = _native_softmax(x, torch.tensor([1.0, 1e-3, 1.0]))
    assert out[:2].isnan().all() and torch.isfinite(out[2]).all()
    assert torch.softmax(x[:2] / torch.tensor([1.0, 1e-3])[:, None], -1).isnan().all()


@pytest.mark.parametrize("vocab", [17, 2048, 49153])
def test_sampling_weights_match_the_torch_rules(vocab, monkeypatch):
    """batch_sampling_probs with the native kernels (one softmax call; top-k before it) against the same rules
    as torch operations (STRATA_NATIVE=0 path): the same weights up to fp32 rounding."""
    g = torch.Generator().manual_seed(1)
    x = _rows(vocab, g)
    params = [SamplingParams(temperature=t, top_k=k, top_p=1.0) for t, k in
              ((0.8, 0), (1.0, 0), (0.5, 5), (1.3, 0), (2.0, 1), (0.7, 0))]
    native = batch_sampling_probs(x.clone(), params)
    monkeypatch.setattr("strata.engine.sampler.native_lib", lambda: None)
    reference = batch_sampling_probs(x.clone(), params)
    assert torch.allclose(native.double(), reference.double(), rtol=1e-5, atol=1e-9)
    assert torch.equal(native == 0, reference == 0)
