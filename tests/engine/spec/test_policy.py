"""The adaptive k rule: more drafts when acceptance is high or a verified row is cheap, none when drafting
cannot pay; the cost fit recovers base and per-row time from observed forwards."""

from strata.engine.sampling_params import SamplingParams
from strata.engine.sequence import Sequence
from strata.engine.spec.policy import AdaptiveK, best_k, expected_tokens


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-12


def test_best_k_grows_with_acceptance_and_shrinks_with_cost():
    assert best_k(0.9, 0.05, 16) > best_k(0.6, 0.05, 16) > best_k(0.3, 0.05, 16)
    assert best_k(0.8, 0.02, 16) > best_k(0.8, 0.3, 16)
    assert best_k(0.05, 0.3, 8) == 0  # a draft accepted 5% of the time cannot pay for 30% of a step


def test_cost_fit_and_choice():
    policy = AdaptiveK(8)
    for rows in (1, 3, 5, 2, 6, 4) * 3:  # base 10 ms, 0.5 ms per row, drafting free
        policy.observe_forward(rows, 0.010 + 0.0005 * rows)
    assert abs(policy.cost() - 0.05) < 1e-6
    seq = Sequence("r", [1, 2, 3], SamplingParams())
    for _ in range(20):
        policy.update(seq, 4, 4)
    assert policy.choose(seq) == 8
    for _ in range(40):
        policy.update(seq, 4, 0)
    assert policy.choose(seq) == 0
    for _ in range(200):  # not drafting drifts the estimate back until the sequence tries again
        if policy.choose(seq):
            break
    assert policy.choose(seq) > 0
