"""Sequence: one generated continuation (a request with n > 1 has n of them); no tensors here."""

from __future__ import annotations

import enum
import itertools
import time

import torch

from strata.engine.sampling_params import SamplingParams

_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, index: int = 0,
                 priority: int = 0):
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.index = index  # position among the request's n choices
        self.priority = priority
        self.token_ids = list(prompt_token_ids)
        self.prompt_token_ids = list(prompt_token_ids)  # handed out with every output: copied once, not per step
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # of the prompt, found in the prefix cache at admission
        self.num_hashed_blocks = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[dict] = []
        # Prompt logprobs: the first token has none; the first sibling of an n > 1 request computes them.
        wants_prompt = params.prompt_logprobs is not None and index == 0
        self.prompt_logprobs: list[dict | None] | None = [None] if wants_prompt else None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.num_preemptions = 0
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed + index)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all computed yet (so the prompt must run, not come from cache)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens
