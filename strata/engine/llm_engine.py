"""LLMEngine: ties Scheduler, BlockManager, ModelRunner and Sampler together; `step()` runs one batch.

The server and the Python API talk to it only through add_request / step / abort_request.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field

import torch

from strata.config import EngineConfig
from strata.engine.block_manager import BlockManager
from strata.engine.detokenizer import IncrementalDetokenizer
from strata.engine.guided import StructuredOutputManager, compile_grammar
from strata.engine.model_runner import ModelRunner, kv_bytes_per_token
from strata.engine.sampler import Sampler
from strata.engine.sampling_params import SamplingParams
from strata.engine.scheduler import Scheduler
from strata.engine.sequence import Sequence
from strata.errors import InvalidRequestError
from strata.tiers.runtime import load_model_tiered
from strata.tokenizer import Tokenizer

SMALL_MODEL_PARAMS = 20_000_000
BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "models", "shakespeare-moe")


@dataclass
class CompletionOutput:
    index: int
    text: str
    delta: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None
    logprobs: list[dict] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, progress: bool = True):
        self.config = config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        path = config.model or BUNDLED_MODEL
        self.model_path = path
        self.model, self.tiers = load_model_tiered(path, config, progress)  # tiers: --memory-budget, routing traces
        if not config.num_threads and self.model.config.param_counts()["total"] < SMALL_MODEL_PARAMS:
            torch.set_num_threads(1)  # tiny matmuls cannot amortise OpenMP fork/join; one thread is faster
        self.tier_stats = (lambda: self.tiers.stats(self.stats["generation_tokens"])) if self.tiers else None
        self.model_config = self.model.config
        # Without tokenizer.json the engine still runs on token ids (benchmarks on synthetic weights).
        self.tokenizer = Tokenizer(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None
        mcfg = self.model_config
        self.max_model_len = config.max_model_len or min(mcfg.max_position_embeddings, 4096)
        dtype = self.model.model.embed_tokens.weight.dtype
        per_block = kv_bytes_per_token(self.model, dtype) * config.block_size
        wanted = config.max_num_seqs * ((self.max_model_len + config.block_size - 1) // config.block_size)
        num_blocks = max(min(wanted, config.kv_cache_memory // per_block), 1)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size)
        eos = (self.tokenizer.eos_token_ids if self.tokenizer else []) or list(mcfg.eos_token_id)
        self.eos_token_ids = eos
        self.structured = StructuredOutputManager(self.tokenizer, mcfg.vocab_size, eos) if self.tokenizer else None
        self.sampler = Sampler(eos, self.structured)
        self._requests: dict[str, list[Sequence]] = {}
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._forks: dict[str, list[Sequence]] = {}  # n > 1 siblings waiting for the first one's prefill
        self._ids = itertools.count()
        self.stats = {"num_steps": 0, "prompt_tokens": 0, "generation_tokens": 0, "step_time_s": 0.0}

    # ---- requests ------------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        params = params or SamplingParams()
        request_id = request_id or f"req-{next(self._ids)}"
        if isinstance(prompt, str) and self.tokenizer is None:
            raise InvalidRequestError(f"{self.model_path}: no tokenizer.json, so prompts must be token ids",
                                      param="prompt")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty and the tokenizer has no BOS token", param="prompt")
        vocab = self.model_config.vocab_size
        if any(not (0 <= t < vocab) for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has {len(ids)} "
                "tokens and at least 1 must be generated",
                param="prompt",
                code="context_length_exceeded",
            )
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if len(ids) + 1 > capacity:
            raise InvalidRequestError(
                f"prompt of {len(ids)} tokens does not fit the KV cache ({capacity} tokens)", param="prompt"
            )
        seqs = [Sequence(request_id, ids, params, index=i, priority=priority) for i in range(params.n)]
        if params.structured_outputs is not None:
            if self.structured is None:
                raise InvalidRequestError(f"{self.model_path}: no tokenizer.json, so no structured outputs",
                                          param="structured_outputs")
            self.structured.add(seqs, compile_grammar(params.structured_outputs))
        self._requests[request_id] = seqs
        # n > 1: siblings join once the first sequence has prefilled, so they find the prompt's full blocks in
        # the prefix cache (shared, ref-counted) instead of computing them again.
        bm = self.block_manager
        share = params.n > 1 and bm.enable_prefix_caching and len(ids) > bm.block_size
        for seq in seqs:
            self._detok[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, ids, params.stop,
                                                             params.skip_special_tokens)
            if seq.index == 0 or not share:
                self.scheduler.add(seq)
        if share:
            self._forks[request_id] = seqs[1:]
        return request_id

    def abort_request(self, request_id: str) -> None:
        self._forks.pop(request_id, None)
        for seq in self._requests.pop(request_id, []):
            if not seq.is_finished:
                self.scheduler.abort(seq)
            self._detok.pop(seq.seq_id, None)
            if self.structured is not None:
                self.structured.free(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        t0 = time.perf_counter()
        if self.structured is not None and self.structured.overlap and self.structured.matchers:
            # the grammar masks fill on a worker thread during the forward
            self.structured.prepare([s for s, n in zip(batch.seqs, batch.num_new_tokens)
                                     if s.num_computed_tokens + n == s.num_tokens])
        logits, sampled_idx = self.runner.execute(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.commit_full_blocks(seq)
        sampled_seqs = [batch.seqs[i] for i in sampled_idx]
        tokens = self.sampler(logits, sampled_seqs) if sampled_seqs else []
        now = time.monotonic()
        touched: dict[str, None] = {}
        for seq, tok in zip(sampled_seqs, tokens):
            if seq.first_token_time is None:
                seq.first_token_time = now
                self.stats["prompt_tokens"] += seq.num_prompt_tokens
                for sibling in self._forks.pop(seq.request_id, ()):
                    self.scheduler.add(sibling)
            seq.token_ids.append(tok)
            self.stats["generation_tokens"] += 1
            if self.structured is not None and not self.structured.accept(seq, tok):
                seq.finish_reason = "abort"  # the grammar refused a sampled token: never happens with its mask
                self.scheduler.finish(seq)
                touched[seq.request_id] = None
                continue
            self._check_finished(seq, tok)
            touched[seq.request_id] = None
        self.stats["num_steps"] += 1
        self.stats["step_time_s"] += time.perf_counter() - t0
        return [self._output(rid) for rid in touched if rid in self._requests]

    def _check_finished(self, seq: Sequence, tok: int) -> None:
        p = seq.params
        detok = self._detok[seq.seq_id]
        reason = None
        if not p.ignore_eos and tok in self.eos_token_ids and seq.num_completion_tokens > p.min_tokens:
            reason, seq.stop_reason = "stop", None
        elif tok in p.stop_token_ids and seq.num_completion_tokens > p.min_tokens:
            reason, seq.stop_reason = "stop", tok
        else:
            detok.add(tok)
            if detok.stop_hit is not None and seq.num_completion_tokens >= p.min_tokens:
                reason, seq.stop_reason = "stop", detok.stop_hit
            elif self.structured is not None and self.structured.is_stopped(seq):
                reason, seq.stop_reason = "stop", None  # the grammar is complete
            elif p.max_tokens is not None and seq.num_completion_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                reason = "length"
        if reason:
            seq.finish_reason = reason
            self.scheduler.finish(seq)

    def _output(self, request_id: str) -> RequestOutput:
        seqs = self._requests[request_id]
        outs = []
        for seq in seqs:
            detok = self._detok[seq.seq_id]
            delta = detok.take_delta(final=seq.is_finished)
            outs.append(CompletionOutput(seq.index, detok.text[: detok.num_emitted], delta,
                                         seq.completion_token_ids, seq.finish_reason, seq.stop_reason,
                                         seq.logprobs if seq.params.logprobs is not None else None))
        finished = all(s.is_finished for s in seqs)
        first = seqs[0]
        out = RequestOutput(request_id, first.token_ids[: first.num_prompt_tokens], outs, finished,
                            num_cached_tokens=first.num_cached_tokens,
                            metrics={"arrival_time": first.arrival_time, "first_token_time": first.first_token_time})
        if finished:
            for seq in seqs:
                self._detok.pop(seq.seq_id, None)
                if self.structured is not None:
                    self.structured.free(seq)
            del self._requests[request_id]
        return out
