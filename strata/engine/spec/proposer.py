"""The proposer interface: given decoding sequences and how many tokens each may draft, propose them.

A proposer may keep per-sequence state (a draft model's KV cache); the engine calls `release(seq)` when a
sequence finishes or is aborted. New kinds (EAGLE-style heads, suffix trees) implement these two methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.engine.sequence import Sequence


@dataclass
class Proposal:
    token_ids: list[int]  # drafted tokens, at most the k asked for (may be empty: decode normally)
    # [len(token_ids), V] the distribution each was drawn from; None = one-hot (a deterministic proposal)
    probs: torch.Tensor | None = None


class Proposer:
    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        """One Proposal per sequence, drafting at most num_tokens[i] tokens after seqs[i].token_ids."""
        raise NotImplementedError

    def release(self, seq: Sequence) -> None:
        """Forget the sequence's state (it finished or was aborted)."""

    def memory_bytes(self) -> int:
        """Bytes the proposer holds (weights and caches); 0 for prompt lookup."""
        return 0
