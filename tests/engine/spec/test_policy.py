"""The adaptive k rule: more drafts when acceptance is high or a verified row is cheap, none when a
verification costs more than it yields; plain steps are probed and speculation retried."""

import itertools

from strata.engine.sampling_params import SamplingParams
from strata.engine.sequence import Sequence
from strata.engine.spec.policy import PROBE_EVERY, AdaptiveK, ExpertTraffic, best_k, expected_tokens


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-12


def test_best_k_grows_with_acceptance_and_shrinks_with_cost():
    def cheap(k):
        return 1 + 0.05 * k

    assert best_k(0.9, cheap, 16) > best_k(0.6, cheap, 16) > best_k(0.3, cheap, 16)
    assert best_k(0.8, cheap, 16) > best_k(0.8, lambda k: 1 + 0.3 * k, 16)
    assert best_k(0.05, lambda k: 1 + 0.3 * k, 8) == 0  # a 5% acceptance cannot pay for 30% of a step


def _policy(plain_s: float, base_s: float, per_row_s: float, max_k: int = 8) -> AdaptiveK:
    policy = AdaptiveK(max_k)
    policy.observe_forward(1, 0, plain_s)
    for rows in (2, 4, 6, 3, 5, 9) * 3:
        policy.observe_forward(rows, rows - 1, base_s + per_row_s * rows)
    return policy


def test_offloaded_target_drafts_many_resident_fast_path_none():
    seq = Sequence("r", [1, 2, 3], SamplingParams())
    offloaded = _policy(plain_s=0.030, base_s=0.030, per_row_s=0.001)  # expert reads dominate every forward
    for _ in range(10):
        offloaded.update(seq, 4, 3)
    assert abs(offloaded.cost(2, 1) - (0.030 + 0.003) / 0.030) < 1e-6
    assert offloaded.plan([seq]) == [8]
    fast = _policy(plain_s=0.001, base_s=0.025, per_row_s=0.0005)  # a plain step takes a 25x faster path
    for _ in range(10):
        fast.update(seq, 4, 3)
    assert fast.plan([seq]) == [0]


def test_probes_plain_steps_and_retries_speculation():
    seq = Sequence("r", [1, 2, 3], SamplingParams())
    offloaded = _policy(plain_s=0.030, base_s=0.030, per_row_s=0.001)
    plans = [offloaded.plan([seq])[0] for _ in range(PROBE_EVERY)]
    assert plans.count(0) == 1  # one plain step per PROBE_EVERY refreshes the plain time
    fast = _policy(plain_s=0.001, base_s=0.025, per_row_s=0.0005)
    plans = [fast.plan([seq])[0] for _ in range(7 * PROBE_EVERY)]
    tries = [i for i, k in enumerate(plans) if k]
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert gaps == [2 * PROBE_EVERY, 4 * PROBE_EVERY]  # retried later each time


def test_a_row_count_where_the_forward_gets_slower_caps_k():
    """Measured on a dense 135M model: 2-4 rows cost ~2 plain steps, 5 rows ~3.4 (a kernel changes)."""
    seq = Sequence("r", [1, 2, 3], SamplingParams())
    policy = AdaptiveK(8)
    policy.observe_forward(1, 0, 0.038)
    for rows, seconds in ((2, 0.070), (3, 0.075), (4, 0.078), (5, 0.130), (6, 0.140), (9, 0.160)):
        policy.observe_forward(rows, rows - 1, seconds)
    for _ in range(10):
        policy.update(seq, 4, 3)
    assert policy.plan([seq]) == [3]


# A fake offloaded target: a forward of `rows` computes for 4 ms + 1.5 ms per row and asks for distinct(rows)
# experts (summed over layers; neighbouring tokens share few, as in real routing), a fraction `miss` of them not
# resident, each miss waiting 4 ms on its read.
SECONDS_PER_MISS = 0.004


def _distinct(rows: int) -> int:
    return round(16 * rows**0.75)


def _forward_s(rows: int, miss: float) -> float:
    return 0.004 + 0.0015 * rows + _distinct(rows) * miss * SECONDS_PER_MISS


def _observe(policy: AdaptiveK, miss: float, times: int, verifies: bool, traffic: bool = True) -> None:
    for _ in range(times):
        for rows in [1, *(range(2, 10) if verifies else ())]:
            d = _distinct(rows)
            used = ExpertTraffic(d, d * miss, d * miss * SECONDS_PER_MISS) if traffic else None
            policy.observe_forward(rows, rows - 1, _forward_s(rows, miss), used)


def _true_best(a: float, miss: float, max_k: int) -> int:
    return best_k(a, lambda k: _forward_s(1 + k, miss) / _forward_s(1, miss), max_k)


def test_expected_expert_misses_enter_the_cost():
    """While the cache holds what tokens route to, a drafted row costs its compute and k is large; when the
    cache turns cold (here seen in plain steps only), each drafted row's new experts cost reads and k drops to
    the best k of the fake target at once. Timings alone (no expert traffic) keep the stale per-row-count
    verification times and draft as many as before."""
    seq = Sequence("r", [1, 2, 3], SamplingParams())
    aware, timings_only = AdaptiveK(8), AdaptiveK(8)
    for policy in (aware, timings_only):
        policy.rate[seq.seq_id] = 0.85
    _observe(aware, 0.05, 5, verifies=True)
    _observe(timings_only, 0.05, 5, verifies=True, traffic=False)
    hot = _true_best(0.85, 0.05, 8)
    assert aware.plan([seq]) == timings_only.plan([seq]) == [hot]
    assert abs(aware.stall(3) - _distinct(3) * 0.05 * SECONDS_PER_MISS) < 1e-9
    _observe(aware, 0.6, 30, verifies=False)
    _observe(timings_only, 0.6, 30, verifies=False, traffic=False)
    cold = _true_best(0.85, 0.6, 8)
    assert cold < hot
    assert aware.plan([seq]) == [cold]
    assert timings_only.plan([seq])[0] >= hot
