"""How many tokens to draft for a sequence this step.

FixedK: always num_speculative_tokens (vLLM's behaviour).
AdaptiveK ("adaptive": true): per sequence, a = the exponentially weighted acceptance rate of its drafted
tokens. A verification of k drafts yields E(k) = (1 - a^(k+1)) / (1 - a) tokens on average and costs
1 + k * c plain decode steps, where c is the measured cost of one more drafted token (drafting it plus its
verify row) relative to a plain step. The rule drafts the k in 1..K with the most tokens per cost, or none
when even k = 1 does not beat a plain step (E(1) < 1 + c). c comes from timing: the target forward time is
fitted as base + rows * per_row (least squares with forgetting) and the proposer's time per drafted token is
averaged; c = (draft + per_row) / base. Where experts come from disk the base step is dominated by expert
reads that a verification shares across its rows, so c is small and k grows; resident, c is larger.
"""

from __future__ import annotations

from strata.engine.sequence import Sequence

PRIOR_ACCEPTANCE = 0.6  # a new sequence's acceptance rate before it has drafted anything
SMOOTHING = 0.3  # weight of the latest verification in a sequence's acceptance rate
FORGET = 0.97  # per step: how fast old timings lose weight in the cost fit
DEFAULT_COST = 0.15  # c before the timings can separate base and per-row cost


class FixedK:
    def __init__(self, k: int):
        self.k = k

    def choose(self, seq: Sequence) -> int:
        return self.k

    def update(self, seq: Sequence, num_drafted: int, num_accepted: int) -> None:
        pass

    def observe_forward(self, num_rows: int, seconds: float) -> None:
        pass

    def observe_proposal(self, num_tokens: int, seconds: float) -> None:
        pass

    def release(self, seq: Sequence) -> None:
        pass


def expected_tokens(a: float, k: int) -> float:
    """Tokens one verification of k drafts yields when each is accepted with probability a (i.i.d.)."""
    return k + 1.0 if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


def best_k(a: float, c: float, max_k: int) -> int:
    """argmax over k in 0..max_k of E(k) / (1 + k c); 0 = decode without drafting."""
    return max(range(max_k + 1), key=lambda k: (expected_tokens(a, k) / (1.0 + k * c), -k))


class AdaptiveK(FixedK):
    def __init__(self, max_k: int):
        super().__init__(max_k)
        self.rate: dict[int, float] = {}
        self._fit = [0.0] * 5  # forgetting sums of 1, x, x^2, y, x*y (x: rows, y: seconds)
        self._draft = [0.0, 0.0]  # forgetting sums of seconds and drafted tokens

    def cost(self) -> float:
        n, sx, sxx, sy, sxy = self._fit
        var = n * sxx - sx * sx
        if n < 3 or var <= 1e-9 * max(n * sxx, 1e-30):
            return DEFAULT_COST
        per_row = max((n * sxy - sx * sy) / var, 0.0)
        base = (sy - per_row * sx) / n
        if base <= 0:
            return DEFAULT_COST
        draft = self._draft[0] / self._draft[1] if self._draft[1] else 0.0
        return (draft + per_row) / base

    def choose(self, seq: Sequence) -> int:
        a = self.rate.get(seq.seq_id, PRIOR_ACCEPTANCE)
        k = best_k(a, self.cost(), self.k)
        if k == 0:  # not drafting measures nothing: drift back towards the prior so the sequence tries again
            self.rate[seq.seq_id] = a + SMOOTHING * (PRIOR_ACCEPTANCE - a) / 4
        return k

    def update(self, seq: Sequence, num_drafted: int, num_accepted: int) -> None:
        a = self.rate.get(seq.seq_id, PRIOR_ACCEPTANCE)
        self.rate[seq.seq_id] = (1 - SMOOTHING) * a + SMOOTHING * num_accepted / num_drafted

    def observe_forward(self, num_rows: int, seconds: float) -> None:
        x = float(num_rows)
        self._fit = [FORGET * s + v for s, v in zip(self._fit, (1.0, x, x * x, seconds, x * seconds))]

    def observe_proposal(self, num_tokens: int, seconds: float) -> None:
        self._draft = [FORGET * self._draft[0] + seconds, FORGET * self._draft[1] + num_tokens]

    def release(self, seq: Sequence) -> None:
        self.rate.pop(seq.seq_id, None)
