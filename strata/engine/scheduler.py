"""Scheduler: continuous batching with a per-step token budget, chunked prefill and preemption by recompute.

Each step runs, for every scheduled sequence, its next `num_new_tokens` uncomputed tokens: 1 for a decoding
sequence, a chunk of the prompt for a prefilling one. Decodes go first, then partial prefills, then new
admissions while the token budget, max_num_seqs (or the fewer sequences a TPOT target allows, see
step_time.py) and free KV blocks allow. No tensors here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from strata.engine.block_manager import BlockManager
from strata.engine.sequence import Sequence, SequenceStatus
from strata.engine.step_time import StepTimeModel


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def row_labels(self) -> list[tuple[str, int]]:
        """(request label, position) of each row of this step's forward, in row order; the n > 1 siblings of
        a request are labelled request_id#index (routing traces, strata/tiers/runtime.py)."""
        rows = []
        for seq, n in zip(self.seqs, self.num_new_tokens):
            label = seq.request_id if seq.index == 0 else f"{seq.request_id}#{seq.index}"
            rows.extend((label, p) for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n))
        return rows


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 step_time: StepTimeModel | None = None):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.step_time = step_time  # with a TPOT target (--max-tpot-ms): caps the running sequences
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.unschedulable: list[Sequence] = []  # finished here: longer than the whole KV cache (see _fits_cache)

    def add(self, seq: Sequence) -> None:
        if seq.priority and self.waiting:
            # lower value = more urgent (vLLM convention); stable among equals
            idx = next((i for i, s in enumerate(self.waiting) if s.priority > seq.priority), len(self.waiting))
            self.waiting.insert(idx, seq)
        else:
            self.waiting.append(seq)

    @property
    def seq_limit(self) -> int:
        """Most sequences running at once: max_num_seqs, or fewer under a TPOT target. Running sequences over
        a limit that shrank go on (no preemption); new ones wait until the batch is under it."""
        if self.step_time is None:
            return self.max_num_seqs
        return min(self.max_num_seqs, self.step_time.seq_limit())

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def _fits_cache(self, seq: Sequence) -> bool:
        """Whether the sequence fits the KV cache at all. One that does not could never be admitted again: it
        would sit at the head of `waiting` forever and block every later request, so it finishes instead."""
        bm = self.block_manager
        if bm.blocks_needed(seq.num_tokens) <= bm.num_blocks:
            return True
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, "length"
        self.unschedulable.append(seq)
        return False

    def take_unschedulable(self) -> list[Sequence]:
        out, self.unschedulable = self.unschedulable, []
        return out

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it goes back to the head of the queue and is recomputed."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        if not self._fits_cache(seq):
            return
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        seqs, counts = [], []
        # 1. running sequences, oldest first; preempt the newest when a decode cannot get a block
        running = SequenceStatus.RUNNING  # a sequence preempted earlier in this loop is WAITING or FINISHED
        bm = self.block_manager
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is not running:
                continue
            if not bm.covers(seq):  # it needs a block (else nothing to do)
                while not bm.can_append(seq):
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is seq:
                        break
                if seq.status is not running:
                    continue
                bm.append_slot(seq)
            n = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        # 2. admissions
        limit = self.seq_limit
        while self.waiting and budget > 0 and len(self.running) < limit:
            seq = self.waiting[0]
            if not self._fits_cache(seq):
                self.waiting.popleft()
                continue
            if not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return ScheduledBatch(seqs, counts)

    def finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        self.block_manager.free(seq)
