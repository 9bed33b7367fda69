"""The rejection sampler leaves the target's distribution unchanged (seeded, statistical, tiny vocabulary)."""

import itertools

import torch

from strata.engine.spec.rejection import greedy_accept, rejection_sample

V, LENGTH, K, N = 4, 3, 2, 20_000
TV_BOUND = 0.04  # the expected sampling noise at N draws over V**LENGTH outcomes is about 0.02


def _tables(seed: int):
    g = torch.Generator().manual_seed(seed)
    target = torch.softmax(torch.randn(V + 1, V, generator=g) * 1.5, -1)  # [prev (V = start), V]
    draft = torch.softmax(torch.randn(V + 1, V, generator=g) * 1.5, -1)  # a different model
    return target, draft


def _exact(target) -> dict[tuple, float]:
    out = {}
    for seq in itertools.product(range(V), repeat=LENGTH):
        prob, prev = 1.0, V
        for t in seq:
            prob, prev = prob * float(target[prev, t]), t
        out[seq] = prob
    return out


def _speculate(target, draft, deterministic: bool, accept_all: bool = False) -> dict[tuple, float]:
    """Empirical distribution of LENGTH-token outputs produced K drafted tokens at a time."""
    g = torch.Generator().manual_seed(1234)
    counts: dict[tuple, int] = {}
    for _ in range(N):
        out: list[int] = []
        while len(out) < LENGTH:
            prev, drafted, qs = (out[-1] if out else V), [], []
            for _ in range(K):
                q = draft[prev]
                tok = int(torch.argmax(q)) if deterministic else int(torch.multinomial(q, 1, generator=g))
                drafted.append(tok)
                qs.append(q)
                prev = tok
            ctx = [out[-1] if out else V] + drafted
            p = torch.stack([target[c] for c in ctx])  # [K + 1, V]
            if accept_all:  # the bug the test must catch: keeping drafts without the acceptance test
                got = drafted
            else:
                got = rejection_sample(p, drafted, None if deterministic else torch.stack(qs), g)
            out.extend(got)
        key = tuple(out[:LENGTH])
        counts[key] = counts.get(key, 0) + 1
    return {k: c / N for k, c in counts.items()}


def _tv(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def test_draft_model_rejection_sampling_keeps_target_distribution():
    target, draft = _tables(0)
    exact = _exact(target)
    assert _tv(_exact(draft), exact) > 0.2  # the draft alone is far from the target
    assert _tv(_speculate(target, draft, deterministic=False), exact) < TV_BOUND


def test_one_hot_proposal_keeps_target_distribution():
    target, draft = _tables(1)
    exact = _exact(target)
    assert _tv(_speculate(target, draft, deterministic=True), exact) < TV_BOUND


def test_the_bound_catches_a_sampler_that_skips_the_acceptance_test():
    target, draft = _tables(0)
    assert _tv(_speculate(target, draft, deterministic=False, accept_all=True), _exact(target)) > 2 * TV_BOUND


def test_greedy_accepts_the_longest_matching_prefix_plus_one():
    assert greedy_accept([5, 6, 7, 8], [5, 6, 9]) == [5, 6, 7]
    assert greedy_accept([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]  # all accepted: the bonus token
    assert greedy_accept([5, 6], [4]) == [5]  # none accepted: the target's own token


def test_rejection_of_an_impossible_draft_token():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])  # the target never emits token 0 first
    for seed in range(20):
        assert rejection_sample(p, [0], None, torch.Generator().manual_seed(seed)) == [1]
