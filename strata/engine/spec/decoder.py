"""SpecDecoder: the engine's hooks for speculative decoding around one target forward.

`prepare(batch)` (after scheduling): each decoding sequence with plain sampling gets up to k drafted tokens
appended to its tokens, KV slots for them reserved in the block manager, and its step widened to 1 + k
tokens; returns how many logits rows each sequence needs (1 + its drafts).
`verify(logits, seqs)` (after the forward): greedy or rejection-sampling acceptance per sequence, then the
drafts leave the token list again; the engine appends the returned tokens one by one (stop checks as usual).
`finish_step(seqs)`: the accepted drafts' KV counts as computed, the rejected tail's blocks are freed.
Sequences with nothing drafted are sampled by the engine's sampler, in the same batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from strata.config import EngineConfig
from strata.engine.block_manager import BlockManager
from strata.engine.sampler import check_finite_logits, needs_processing, sampling_probs
from strata.engine.scheduler import ScheduledBatch
from strata.engine.sequence import Sequence
from strata.engine.spec.config import SpeculativeConfig
from strata.engine.spec.ngram import NgramProposer
from strata.engine.spec.policy import AdaptiveK, ExpertTraffic, FixedK
from strata.engine.spec.proposer import Proposal, Proposer
from strata.engine.spec.rejection import greedy_accept, rejection_sample


def make_proposer(spec: SpeculativeConfig, target_path: str, config: EngineConfig) -> Proposer:
    if spec.method == "ngram":
        return NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
    from strata.engine.spec.draft_model import DraftModelProposer

    return DraftModelProposer(spec.model, target_path, config)


def can_speculate(seq: Sequence) -> bool:
    """Sampling whose distribution at a drafted position does not depend on the tokens before it."""
    p = seq.params
    return (
        p.logprobs is None
        and not needs_processing(seq)  # penalties and min_tokens depend on the tokens before it
        and p.structured_outputs is None  # so does a grammar's mask
    )


class SpecDecoder:
    def __init__(
        self,
        spec: SpeculativeConfig,
        proposer: Proposer,
        block_manager: BlockManager,
        max_model_len: int,
        max_num_batched_tokens: int,
        expert_traffic: Callable[[], ExpertTraffic | None] | None = None,
    ):
        """expert_traffic: the expert cache's running totals (tiers), or None without one."""
        self.spec = spec
        self.proposer = proposer
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        k = spec.num_speculative_tokens
        self.policy = AdaptiveK(k) if spec.adaptive else FixedK(k)
        self.expert_traffic = expert_traffic if spec.adaptive else None  # only the adaptive rule reads it
        # (rows, drafted rows, start time, expert traffic totals) of the forward in flight
        self._forward_start: tuple[int, int, float, ExpertTraffic | None] | None = None
        self._pending: dict[int, Proposal] = {}  # seq_id -> its drafts in this step
        self._accepted: dict[int, int] = {}  # seq_id -> drafts accepted in this step
        self.num_drafts = 0  # verifications with at least one drafted token
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    # ---- before the forward ---------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> list[int]:
        """Draft for the decoding sequences of the batch; returns logits rows per sequence (1 + drafts)."""
        budget = self.max_num_batched_tokens - batch.num_tokens
        # no prefill rows: then the forward's time says what k costs
        decode_only = batch.num_tokens == len(batch.seqs)
        eligible = [
            i
            for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
            if n == 1
            and seq.num_uncomputed_tokens == 1
            and seq.num_completion_tokens > 0
            and can_speculate(seq)
        ]
        cands, ks = [], []
        for i, k in zip(eligible, self.policy.plan([batch.seqs[i] for i in eligible]) if eligible else []):
            seq = batch.seqs[i]
            left = (
                seq.params.max_tokens - seq.num_completion_tokens
                if seq.params.max_tokens
                else self.max_model_len
            )
            k = min(k, left - 1, self.max_model_len - seq.num_tokens - 1, budget)
            if k > 0:
                cands.append(i)
                ks.append(k)
                budget -= k
        num_scored = [1] * len(batch.seqs)
        t0 = time.perf_counter()
        proposals = self.proposer.propose([batch.seqs[i] for i in cands], ks) if cands else []
        if cands:
            self.policy.observe_proposal(sum(len(p.token_ids) for p in proposals), time.perf_counter() - t0)
        for i, k, prop in zip(cands, ks, proposals):
            seq, drafts = batch.seqs[i], prop.token_ids[:k]
            if not drafts or not self.block_manager.reserve(seq, seq.num_tokens + len(drafts)):
                continue
            if prop.probs is not None:
                prop.probs = prop.probs[: len(drafts)]
            prop.token_ids = drafts
            seq.token_ids.extend(drafts)
            batch.num_new_tokens[i] += len(drafts)
            num_scored[i] += len(drafts)
            self._pending[seq.seq_id] = prop
        if decode_only:
            traffic = self.expert_traffic() if self.expert_traffic else None
            self._forward_start = (batch.num_tokens, batch.num_tokens - len(batch.seqs), time.perf_counter(), traffic)
        return num_scored

    # ---- after the forward ----------------------------------------------------------------------
    def verify(self, logits: torch.Tensor, seqs: list[Sequence], sampler) -> list[list[int]]:
        """logits: the rows prepare() asked for, sequence after sequence -> new tokens per sequence."""
        check_finite_logits(logits)
        if self._forward_start is not None:
            rows, drafted, t0, before = self._forward_start
            seconds, after = time.perf_counter() - t0, before and self.expert_traffic()
            used = ExpertTraffic(*(a - b for a, b in zip(after, before))) if after else None
            self.policy.observe_forward(rows, drafted, seconds, used)
            self._forward_start = None
        out: list[list[int] | None] = []
        plain_rows, plain_seqs, row = [], [], 0
        for seq in seqs:
            prop = self._pending.pop(seq.seq_id, None)
            if prop is None:
                plain_rows.append(row)
                plain_seqs.append(seq)
                out.append(None)
                row += 1
                continue
            d = len(prop.token_ids)
            rows = logits[row : row + d + 1]  # [d + 1, V]
            row += d + 1
            if seq.params.is_greedy:
                tokens = greedy_accept(torch.argmax(rows, dim=-1).tolist(), prop.token_ids)
            else:
                tokens = rejection_sample(
                    sampling_probs(rows, seq.params), prop.token_ids, prop.probs, seq.generator
                )
            accepted = len(tokens) - 1
            del seq.token_ids[-d:]
            seq.num_computed_tokens -= d  # the accepted drafts' KV counts once finish_step re-appended them
            self._accepted[seq.seq_id] = accepted
            self.policy.update(seq, d, accepted)
            self.num_drafts += 1
            self.num_draft_tokens += d
            self.num_accepted_tokens += accepted
            out.append(tokens)
        if plain_seqs:
            sampled = iter(sampler(logits[plain_rows], plain_seqs))
            out = [o if o is not None else [next(sampled)] for o in out]
        return out

    def finish_step(self, seqs: list[Sequence]) -> None:
        """After the engine appended the new tokens: keep the accepted drafts' KV, free the rejected tail."""
        for seq in seqs:
            accepted = self._accepted.pop(seq.seq_id, None)
            if seq.is_finished:
                self.release(seq)
            elif accepted is not None:
                seq.num_computed_tokens += accepted
                self.block_manager.release_tail(seq, seq.num_tokens)

    def release(self, seq: Sequence) -> None:
        self._pending.pop(seq.seq_id, None)
        self._accepted.pop(seq.seq_id, None)
        self.proposer.release(seq)
        self.policy.release(seq)

    # ---- statistics -------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "spec_method": self.spec.method,
            "spec_num_drafts": self.num_drafts,
            "spec_num_draft_tokens": self.num_draft_tokens,
            "spec_num_accepted_tokens": self.num_accepted_tokens,
            "spec_acceptance_rate": self.num_accepted_tokens / self.num_draft_tokens
            if self.num_draft_tokens
            else None,
            "spec_mean_accepted_tokens": self.num_accepted_tokens / self.num_drafts
            if self.num_drafts
            else None,
            "spec_proposer_bytes": self.proposer.memory_bytes(),
        }
