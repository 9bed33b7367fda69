"""How many tokens to draft for a sequence this step.

Fixed: always num_speculative_tokens (vLLM's behaviour). Adaptive: per sequence, an exponentially weighted
acceptance rate a of drafted tokens; with the tokens one verification yields being (1 - a^(k+1)) / (1 - a)
and its cost growing with k, the rule drafts the smallest k that reaches within one `tail` of the expected
tokens of the largest k; see docs/speculative.md for the rule and its effect.
"""

from __future__ import annotations

from strata.engine.sequence import Sequence


class FixedK:
    def __init__(self, k: int):
        self.k = k

    def choose(self, seq: Sequence) -> int:
        return self.k

    def update(self, seq: Sequence, num_drafted: int, num_accepted: int) -> None:
        pass

    def release(self, seq: Sequence) -> None:
        pass
