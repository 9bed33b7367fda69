"""StepTimeModel: a running estimate of a decode step's time against the number of sequences in it, and the most
sequences a step can hold under a TPOT target (`--max-tpot-ms`). No tensors here.

Each batch size keeps an exponential moving average of the pure decode steps measured at that size (a step
that also prefills a prompt is longer and says nothing about TPOT). A least-squares line through those averages
predicts the sizes not measured yet. With one size measured there is no slope, so the limit grows one sequence
past it while it is within the target; a slope at or below zero (noise, or a step bound by something else)
grows it the same way, one at a time, instead of trusting an extrapolation. A size not measured for a while
is forgotten (STALE_AFTER_STEPS), so a slow spell does not cap the batch for good.
"""

from __future__ import annotations

SMOOTHING = 0.2  # weight of a new measurement in its batch size's average
# A size not measured in this many decode steps is forgotten: one slow spell (another process, a GC pause) must
# not keep its size, and those the line puts above it, out of the batch for good. Forgotten, it is tried again.
STALE_AFTER_STEPS = 256


class StepTimeModel:
    def __init__(self, target_s: float, max_num_seqs: int):
        self.target_s = target_s
        self.max_num_seqs = max_num_seqs
        self.avg_s: dict[int, float] = {}  # decode batch size -> moving average of its step seconds
        self._last_seen: dict[int, int] = {}  # decode batch size -> num_steps when it was last measured
        self.num_steps = 0

    def observe(self, num_seqs: int, seconds: float) -> None:
        """One pure decode step of num_seqs sequences took `seconds`."""
        self.num_steps += 1
        prev = self.avg_s.get(num_seqs)
        self.avg_s[num_seqs] = seconds if prev is None else prev + SMOOTHING * (seconds - prev)
        self._last_seen[num_seqs] = self.num_steps
        for n in [n for n, seen in self._last_seen.items() if self.num_steps - seen > STALE_AFTER_STEPS]:
            del self.avg_s[n], self._last_seen[n]

    def predict(self, num_seqs: int) -> float | None:
        """Expected step seconds at num_seqs sequences (None before two batch sizes are measured, unless this
        one is)."""
        if num_seqs in self.avg_s:
            return self.avg_s[num_seqs]
        line = self._line()
        return None if line is None else line[0] + line[1] * num_seqs

    def _line(self) -> tuple[float, float] | None:
        """(intercept, slope) of the least-squares line through the per-size averages; None below two sizes."""
        if len(self.avg_s) < 2:
            return None
        n = len(self.avg_s)
        mx = sum(self.avg_s) / n
        my = sum(self.avg_s.values()) / n
        sxx = sum((x - mx) ** 2 for x in self.avg_s)
        slope = sum((x - mx) * (y - my) for x, y in self.avg_s.items()) / sxx
        return my - slope * mx, slope

    def seq_limit(self) -> int:
        """Most sequences the next decode steps may run (at least 1, at most max_num_seqs)."""
        if not self.avg_s:
            return 1  # nothing measured: start with one and grow as steps are measured
        within = [n for n, t in self.avg_s.items() if t <= self.target_s]
        grown = max(within) + 1 if within else 1
        line = self._line()
        if line is not None and line[1] > 0:
            intercept, slope = line
            fit = int((self.target_s - intercept) / slope)
            measured_over = [n for n, t in self.avg_s.items() if t > self.target_s]
            if measured_over:  # a size measured over the target is never run again, whatever the line says
                fit = min(fit, min(measured_over) - 1)
            grown = max(fit, 1)
        return max(1, min(grown, self.max_num_seqs))
