"""How many tokens to draft for each sequence this step.

FixedK: always num_speculative_tokens (vLLM's behaviour).
AdaptiveK ("adaptive": true), in units of one plain decode step:
- a = the sequence's exponentially weighted acceptance rate; a verification of k drafts yields on average
  E(k) = (1 - a^(k+1)) / (1 - a) tokens (E(0) = 1: a plain step);
- cost(k) = (compute(r + k) + stall(r + k) + k * draft) / (plain + stall(r)) for a step of r sequences, all
  measured: `plain` is the compute time of a forward without drafts, `compute(rows)` that of a forward with
  drafts and that many rows (averaged with forgetting; a row count not seen yet is read off a least-squares
  line through the ones seen, so larger k gets tried), `draft` the proposer's time per drafted token;
  cost(0) = 1;
- with experts served from an expert cache (tiers), a forward's time splits into compute and the time it
  waited on expert reads, and stall(rows) = distinct(rows) * miss_rate * stall_per_miss: the distinct experts
  a forward of that many rows asks for (summed over MoE layers, learned per row count like compute), the
  fraction of requested experts the cache has recently not held, and the wait one miss has recently cost.
  The cache state enters through miss_rate: while the experts that tokens route to stay resident, a drafted
  row costs its compute only and k grows; while the cache misses, each drafted row's new experts cost reads
  and k shrinks, at once rather than as old per-row-count timings fade; without an expert cache stall is 0;
- the rule drafts the k in 0..K with the most tokens per cost, E(k) / cost(k).
Where a plain step runs a fast one-row path (the native decoder of a small resident model) and a verification
does not, cost(1) is high and the rule stops drafting.
Every PROBE_EVERY steps of speculation one step runs plain to refresh `plain`; while the rule says plain,
speculation is retried after PROBE_EVERY steps, then twice as long each time it still does not pay.
"""

from __future__ import annotations

from typing import NamedTuple

from strata.engine.sequence import Sequence

PRIOR_ACCEPTANCE = 0.6  # a new sequence's acceptance rate before it has drafted anything
SMOOTHING = 0.3  # weight of the latest verification in a sequence's acceptance rate
FORGET = 0.8  # per observation: how fast old timings lose weight
DEFAULT_COST = 0.15  # cost of one drafted token, in plain steps, before anything is measured
PROBE_EVERY = 16
MAX_PROBE_EVERY = 1024


class ExpertTraffic(NamedTuple):
    """One forward's demand traffic at the expert cache (or, from the tiers, the running totals)."""

    accesses: int  # distinct experts asked for, summed over MoE layers
    misses: int  # of those, not resident: a demand read started
    stall_s: float  # seconds the forward waited on expert reads


class FixedK:
    def __init__(self, k: int):
        self.k = k

    def plan(self, seqs: list[Sequence]) -> list[int]:
        return [self.k] * len(seqs)

    def update(self, seq: Sequence, num_drafted: int, num_accepted: int) -> None:
        pass

    def observe_forward(self, num_rows: int, num_drafted: int, seconds: float,
                        experts: ExpertTraffic | None = None) -> None:
        pass

    def observe_proposal(self, num_tokens: int, seconds: float) -> None:
        pass

    def release(self, seq: Sequence) -> None:
        pass


def expected_tokens(a: float, k: int) -> float:
    """Tokens one verification of k drafts yields when each is accepted with probability a (i.i.d.)."""
    return k + 1.0 if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


def _average(table: dict[int, float], key: int, value: float) -> None:
    old = table.get(key)
    table[key] = value if old is None else FORGET * old + (1 - FORGET) * value


def _fit(table: dict[int, float], rows: int) -> float:
    """table[rows], or where not measured, a least-squares line through the row counts measured (not falling)."""
    if rows in table:
        return table[rows]
    xs, ys = list(table), list(table.values())
    n, sx, sy = len(xs), sum(xs), sum(ys)
    var = n * sum(x * x for x in xs) - sx * sx
    slope = max((n * sum(x * y for x, y in zip(xs, ys)) - sx * sy) / var, 0.0) if var > 0 else 0.0
    return (sy - slope * sx) / n + slope * rows


def best_k(a: float, cost, max_k: int) -> int:
    """argmax over k in 0..max_k of E(k) / cost(k); ties go to the smaller k."""
    return max(range(max_k + 1), key=lambda k: (expected_tokens(a, k) / (cost(k) if k else 1.0), -k))


class AdaptiveK(FixedK):
    def __init__(self, max_k: int):
        super().__init__(max_k)
        self.rate: dict[int, float] = {}
        # rows of a forward with drafts -> its compute seconds (average with forgetting)
        self._verify: dict[int, float] = {}
        self._draft = [0.0, 0.0]  # forgetting sums of proposer seconds and drafted tokens
        self._plain: float | None = None  # forgetting average of a plain forward's compute seconds
        self._steps = 0  # since the last probe
        self._probe_every = PROBE_EVERY
        self._speculating = True
        # expert cache (tiers): rows -> distinct experts a forward asks for; forgetting sums of
        # (misses, accesses) and of (stall seconds, misses)
        self._distinct: dict[int, float] = {}
        self._misses = [0.0, 0.0]
        self._stalls = [0.0, 0.0]

    def cost(self, k: int, num_rows: int) -> float:
        """A verification with k more drafted rows on a forward of num_rows, in plain steps."""
        if self._plain is None or not self._verify:
            return 1.0 + k * DEFAULT_COST
        draft = self._draft[0] / self._draft[1] if self._draft[1] else 0.0
        verify = _fit(self._verify, num_rows + k) + self.stall(num_rows + k)
        return max(verify + k * draft, 1e-9) / max(self._plain + self.stall(num_rows), 1e-9)

    def stall(self, rows: int) -> float:
        """Expected seconds a forward of `rows` waits on expert reads: distinct experts x miss rate x
        seconds per miss, from the recent forwards (0 without an expert cache)."""
        if not self._distinct or not self._misses[1] or not self._stalls[1]:
            return 0.0
        miss_rate = self._misses[0] / self._misses[1]
        return _fit(self._distinct, rows) * miss_rate * self._stalls[0] / self._stalls[1]

    def plan(self, seqs: list[Sequence]) -> list[int]:
        self._steps += 1
        probe = self._steps >= self._probe_every
        if probe:
            self._steps = 0
        if (probe and self._speculating) or (self._plain is None and self._verify):
            return [0] * len(seqs)  # measure a plain step
        rows = len(seqs)
        ks = [
            best_k(self.rate.get(s.seq_id, PRIOR_ACCEPTANCE), lambda k: self.cost(k, rows), self.k)
            for s in seqs
        ]
        if any(ks):
            self._speculating, self._probe_every = True, PROBE_EVERY
        elif self._speculating:
            self._speculating = False
        elif probe:  # speculation has not paid: try again, and wait twice as long before the next try
            self._probe_every = min(2 * self._probe_every, MAX_PROBE_EVERY)
            ks = [max(1, self.k // 2)] * len(seqs)
        return ks

    def update(self, seq: Sequence, num_drafted: int, num_accepted: int) -> None:
        a = self.rate.get(seq.seq_id, PRIOR_ACCEPTANCE)
        self.rate[seq.seq_id] = (1 - SMOOTHING) * a + SMOOTHING * num_accepted / num_drafted

    def observe_forward(self, num_rows: int, num_drafted: int, seconds: float,
                        experts: ExpertTraffic | None = None) -> None:
        if experts is not None and experts.accesses:
            _average(self._distinct, num_rows, experts.accesses)
            self._misses = [FORGET * self._misses[0] + experts.misses, FORGET * self._misses[1] + experts.accesses]
            self._stalls = [FORGET * self._stalls[0] + experts.stall_s, FORGET * self._stalls[1] + experts.misses]
            seconds = max(seconds - experts.stall_s, 0.0)  # the compute part; stall() models the rest
        if not num_drafted:
            self._plain = seconds if self._plain is None else FORGET * self._plain + (1 - FORGET) * seconds
            return
        _average(self._verify, num_rows, seconds)

    def observe_proposal(self, num_tokens: int, seconds: float) -> None:
        self._draft = [FORGET * self._draft[0] + seconds, FORGET * self._draft[1] + num_tokens]

    def release(self, seq: Sequence) -> None:
        self.rate.pop(seq.seq_id, None)
