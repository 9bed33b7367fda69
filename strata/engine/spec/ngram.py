"""Prompt lookup (n-gram) proposer: no draft model; proposes what followed the sequence's own last n tokens.

For n from prompt_lookup_max down to prompt_lookup_min, find the latest earlier occurrence of the sequence's
last n tokens (prompt and output alike) and propose the k tokens that followed it. Where fewer than k tokens
follow the match (it ends near the sequence's end: the text repeats with period p = L - start), the copy runs
on into the tokens it has just proposed, as an LZ77 copy does, i.e. the period repeats. Pays off where the output
repeats its input (summaries, edits, code completion over given code) or itself.
"""

from __future__ import annotations

import numpy as np

from strata.engine.sequence import Sequence
from strata.engine.spec.proposer import Proposal, Proposer


def lookup(token_ids: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """k tokens after the latest earlier match of the longest suffix n-gram (max_n >= n >= min_n); none without
    a match."""
    tokens = np.asarray(token_ids, dtype=np.int64)  # [L]
    L = len(tokens)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)  # [L - n, n]: each has a follower
        hits = np.flatnonzero((windows == tokens[L - n :]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            follow = tokens[start:]  # [p]: what followed the match, up to the sequence's end
            return np.resize(follow, k).tolist()  # [k]: cut, or repeated periodically past the end
    return []


class NgramProposer(Proposer):
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int):
        self.min_n, self.max_n = prompt_lookup_min, prompt_lookup_max

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        return [Proposal(lookup(s.token_ids, k, self.min_n, self.max_n)) for s, k in zip(seqs, num_tokens)]
