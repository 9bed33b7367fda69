"""LLMEngine: ties Scheduler, BlockManager, ModelRunner and Sampler together; `step()` runs one batch.

The server and the Python API talk to it only through its methods: add_request / step / abort_request, embed,
and the read-outs below them (running and waiting requests, free sequence slots, get_stats).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable

import torch

from strata.config import EngineConfig
from strata.engine.admission import (
    check_request_fits,
    check_token_ids,
    fit_max_model_len,
    resolve_max_model_len,
)
from strata.engine.block_manager import BlockManager
from strata.engine.detokenizer import IncrementalDetokenizer
from strata.engine.guided import StructuredOutputManager, compile_grammar
from strata.engine.model_runner import ModelRunner, num_kv_blocks
from strata.engine.outputs import (  # CompletionOutput: callers import the output types from here too
    CompletionOutput,  # noqa: F401
    DeferredOutput,
    RequestOutput,
    completion_output,
    request_output,
)
from strata.engine.sampler import IsolatingSampler, Sampler, tokens_logprobs
from strata.engine.sampling_params import SamplingParams
from strata.engine.scheduler import Scheduler
from strata.engine.sequence import Sequence, SequenceStatus
from strata.engine.spec.config import SpeculativeConfig
from strata.engine.spec.decoder import SpecDecoder, make_proposer
from strata.engine.spec.policy import ExpertTraffic
from strata.engine.step_time import StepTimeModel
from strata.errors import InvalidRequestError
from strata.layers.quant_linear import QuantLinear
from strata.tiers.runtime import load_model_tiered
from strata.tokenizer import Tokenizer
from strata.weights.gguf_cache import resolve_model_path

SMALL_MODEL_PARAMS = 20_000_000
# threads of models under SMALL_MODEL_PARAMS without --num-threads: the kernels split a call among threads only
# from sizes where that pays (PAR_FOR in quant_cpu.h, MOE_PAR_MIN_MACS); the bundled model's decode step on 2
# threads took 0.85x (1 sequence) and 0.69x (16) of 1 thread's (docs/benchmarks.md); more than 2 not measured
SMALL_MODEL_THREADS = 2
WARM_UP_S = 0.2  # start-up time a server spends at most (about) on warm_up
PROMPT_LOGPROBS_ROWS = 256  # prompt positions turned into logits at once (bounds the [rows, vocab] tensors)
log = logging.getLogger(__name__)
BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "models", "shakespeare-moe")


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, progress: bool = True):
        self.config = config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if config.seed is not None:
            torch.manual_seed(config.seed)
        path = resolve_model_path(config.model or BUNDLED_MODEL, progress)  # a GGUF file: its converted folder
        self.model_path = path
        spec = SpeculativeConfig.from_value(config.speculative_config)
        # The tokenizer and the draft load first: the memory budget plan measures what is already resident as
        # runtime (tiers/runtime.py; a 50k-token BPE vocabulary holds ~40 MB). Without tokenizer.json the engine
        # still runs on token ids (benchmarks on synthetic weights).
        tok_path = config.tokenizer or path
        self.tokenizer = Tokenizer(tok_path) if config.tokenizer or os.path.exists(
            os.path.join(path, "tokenizer.json")) else None
        proposer = make_proposer(spec, path, config) if spec else None
        if config.tensor_parallel_size > 1:  # ranks spawned here; this process is rank 0 (strata/distributed)
            from strata.distributed.launcher import load_model_parallel

            self.model, self.tiers = load_model_parallel(path, config, progress)  # tiers: rank 0's (EP budget)
        else:
            self.model, self.tiers = load_model_tiered(path, config, progress)  # tiers: --memory-budget, traces
        if not config.num_threads and self.model.config.param_counts()["total"] < SMALL_MODEL_PARAMS:
            torch.set_num_threads(min(torch.get_num_threads(), SMALL_MODEL_THREADS))
        self.tier_stats = (lambda: self.tiers.stats(self.stats["generation_tokens"])) if self.tiers else None
        self.model_config = self.model.config
        mcfg = self.model_config
        max_len = resolve_max_model_len(config, mcfg, path)
        num_blocks = num_kv_blocks(self.model, config.block_size, config.max_num_seqs, max_len,
                                   config.kv_cache_memory)
        self.max_model_len = fit_max_model_len(config.max_model_len, max_len, num_blocks * config.block_size,
                                               config.kv_cache_memory)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        step_time = config.max_tpot_ms and StepTimeModel(config.max_tpot_ms / 1e3, config.max_num_seqs)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   step_time or None)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size)
        eos = (self.tokenizer.eos_token_ids if self.tokenizer else []) or list(mcfg.eos_token_id)
        self.eos_token_ids = eos
        self.structured = StructuredOutputManager(self.tokenizer, mcfg.vocab_size, eos) if self.tokenizer else None
        self.sampler = Sampler(eos, self.structured)
        self.spec = spec and SpecDecoder(spec, proposer, self.block_manager, self.max_model_len,
                                         config.max_num_batched_tokens, self._expert_traffic)
        self._requests: dict[str, list[Sequence]] = {}
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._forks: dict[str, list[Sequence]] = {}  # n > 1 siblings waiting for the first one's prefill
        self._ids = itertools.count()
        # called by step() once per forward, right before its layers run: inside the one-call native decode, right
        # before its GIL-free native code (the server wakes its event loop there, so that the loop's Python runs
        # beside the native code; woken earlier, the loop would take the GIL at the step's next torch op and the
        # engine thread would wait for it)
        self.before_forward: Callable[[], None] | None = None
        self._deferred = False  # see defer_detokenization
        self.stats = {"num_steps": 0, "prompt_tokens": 0, "generation_tokens": 0, "step_time_s": 0.0}

    def warm_up(self, budget_s: float = WARM_UP_S) -> None:
        """Runs prompts of the lengths whose first use is slow once before serving (ModelRunner.warm_up), for at
        most about budget_s; a server calls it at start, before any request. Small models only (under
        SMALL_MODEL_PARAMS): there a first use costs as much as a prompt, and a forward takes milliseconds.
        Skipped for tiered experts (it would read them from disk) and tensor parallelism (every rank would
        have to join)."""
        if (self.tiers is not None or self.config.tensor_parallel_size > 1 or self.stats["num_steps"]
                or self.model_config.param_counts()["total"] >= SMALL_MODEL_PARAMS):
            return  # after a step, the cache's first slots may hold a sequence's K/V
        t0 = time.perf_counter()
        max_tokens = min(self.max_model_len, self.config.max_num_batched_tokens)
        lengths = self.runner.warm_up(max_tokens, budget_s)
        log.debug("warm-up: %d prompt forwards of %s tokens in %.0f ms", len(lengths),
                  f"{lengths[0]}-{lengths[-1]}" if lengths else "no", (time.perf_counter() - t0) * 1e3)

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
        check_request_fits(len(ids), params.max_tokens, self.max_model_len)
        check_token_ids(params, vocab)
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

    def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """One L2-normalized mean-pooled embedding per prompt, computed in batches of at most
        max_num_batched_tokens tokens (call between steps: it uses the model, not the KV cache)."""
        if self.tiers is not None:
            self.tiers.label_rows([])  # rows that are no request's tokens: routing traces label them by position
        out, batch, num = [], [], 0
        for ids in prompts:
            if batch and num + len(ids) > self.config.max_num_batched_tokens:
                out.extend(self.runner.embed(batch).tolist())
                batch, num = [], 0
            batch.append(ids)
            num += len(ids)
        if batch:
            out.extend(self.runner.embed(batch).tolist())
        return out

    def abort_request(self, request_id: str) -> None:
        self._forks.pop(request_id, None)
        for seq in self._requests.pop(request_id, []):
            if not seq.is_finished:
                self.scheduler.abort(seq)
            if self.spec:
                self.spec.release(seq)
            self._detok.pop(seq.seq_id, None)
            if self.structured is not None:
                self.structured.free(seq)

    def _expert_traffic(self) -> ExpertTraffic | None:
        """The expert cache's demand totals, for the adaptive k rule; None without an expert cache."""
        s = self.tier_stats() if self.tier_stats else None
        if not s or not s.get("tiered"):
            return None
        return ExpertTraffic(s["expert_accesses"], s["expert_misses"], s["io_stall_s"])

    def describe(self) -> str:
        """One line for a server's start-up log: the model, compute dtype, threads and capacity; and a hint where a
        quantized model computes in float32 (a GGUF file's default), whose kernels run faster on bf16."""
        dtype = str(self.runner.dtype).removeprefix("torch.")
        threads = torch.get_num_threads()
        line = (f"{os.path.basename(os.path.normpath(self.model_path))}: {dtype} compute, {threads} "
                f"thread{'s' if threads != 1 else ''}, up to {self.config.max_num_seqs} sequences of "
                f"{self.max_model_len} tokens, KV cache {self.runner.num_blocks * self.runner.block_size} tokens")
        if self.runner.dtype == torch.float32 and any(isinstance(m, QuantLinear) for m in self.model.modules()):
            line += " (a quantized model in float32: --dtype bfloat16 runs faster, within bf16 rounding)"
        return line

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- read-outs for the server and its metrics ------------------------------------------------
    def running_request_ids(self) -> list[str]:
        """Ids of the requests with a sequence in the running batch (scheduler order, each once)."""
        return list(dict.fromkeys(s.request_id for s in self.scheduler.running))

    def waiting_request_ids(self) -> list[str]:
        """Ids of the requests with a sequence waiting (new, or preempted and queued again), each once."""
        return list(dict.fromkeys(s.request_id for s in self.scheduler.waiting))

    def num_free_seq_slots(self) -> int:
        """Sequences the next step could still admit under max_num_seqs."""
        return max(self.scheduler.seq_limit - len(self.scheduler.running), 0)

    def num_free_kv_blocks(self) -> int:
        """KV-cache blocks no sequence holds (a replica router's load measure)."""
        return self.block_manager.num_free_blocks

    def get_stats(self) -> dict:
        """Gauges and running totals: KV blocks, prefix cache, preemptions, speculative decoding (None
        without it) and tiered experts (None without tiers)."""
        bm = self.block_manager
        spec = self.spec and {"num_drafts": self.spec.num_drafts, "num_draft_tokens": self.spec.num_draft_tokens,
                              "num_accepted_tokens": self.spec.num_accepted_tokens}
        return {"kv_cache_usage": bm.usage, "num_blocks": bm.num_blocks, "num_free_blocks": bm.num_free_blocks,
                "num_prefix_queries": bm.num_prefix_queries, "num_prefix_hits": bm.num_prefix_hits,
                "num_preemptions": self.scheduler.num_preemptions, "spec_decode": spec or None,
                "tiers": self.tier_stats() if self.tier_stats else None}

    def isolate_sampling_failures(self) -> None:
        """From now on a sampling error fails only the requests whose rows raised (see
        take_sampling_failures) instead of the whole step; the server turns this on."""
        if not isinstance(self.sampler, IsolatingSampler):
            self.sampler = IsolatingSampler(self.sampler, self.eos_token_ids[0] if self.eos_token_ids else 0)

    def defer_detokenization(self) -> None:
        """From now on the outputs of requests without stop strings are DeferredOutputs: their tokens are
        detokenized, and their RequestOutputs built, by whoever calls resolve(), once per output and in step
        order (strata/engine/outputs.py); the server does it in its event loop."""
        self._deferred = True

    def detokenizer_state(self, seq: Sequence) -> dict:
        """The fields of a sequence's detokenizer (migration), as they stand once every output handed out so far
        has been resolved. A deferred detokenizer belongs to its consumer's thread: the state comes from a
        copy fed the sequence's tokens, which without stop strings is where the consumer's one ends up (it hands
        out all of a step's text)."""
        detok = self._detok[seq.seq_id]
        if self._deferred and not detok.stop and not seq.is_finished:
            detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, [], seq.params.skip_special_tokens)
            for tok in seq.completion_token_ids:
                detok.add(tok)
            detok.take_delta(final=False)
        return {k: v for k, v in vars(detok).items() if k not in ("tokenizer", "_stream")}  # the stream is rebuilt

    def take_sampling_failures(self) -> dict[str, Exception]:
        """request id -> the error its sampling raised since the last call (after isolate_sampling_failures)."""
        failed = getattr(self.sampler, "failed", None)
        if not failed:
            return {}
        self.sampler.failed = {}
        return failed

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput | DeferredOutput]:
        t_start = time.perf_counter()
        batch = self.scheduler.schedule()
        dropped = self._drop_unschedulable()
        if not batch.seqs:
            return [self._output(rid) for rid in dropped if rid in self._requests]
        t0 = time.perf_counter()
        step_time = self.scheduler.step_time
        # a TPOT target learns from pure decode steps only (a prompt chunk makes a step longer, drafts shorter)
        timed = step_time is not None and self.spec is None and all(
            n == 1 and s.num_computed_tokens + 1 == s.num_tokens for s, n in zip(batch.seqs, batch.num_new_tokens))
        if self.structured is not None and self.structured.overlap and self.structured.matchers:
            # the grammar masks fill on a worker thread during the forward
            self.structured.prepare([s for s, n in zip(batch.seqs, batch.num_new_tokens)
                                     if s.num_computed_tokens + n == s.num_tokens])
        num_scored = self.spec.prepare(batch) if self.spec else None  # drafts widen decoding sequences' steps
        if self.tiers is not None:
            self.tiers.label_rows(batch.row_labels())  # routing record / replay key each row by request
        if self.before_forward is None:  # (tests and benchmarks wrap execute with these two arguments)
            logits, sampled_idx, prompt_hidden = self.runner.execute(batch, num_scored)
        else:
            logits, sampled_idx, prompt_hidden = self.runner.execute(batch, num_scored, self.before_forward)
        for i, (target, hidden) in prompt_hidden.items():
            seq = batch.seqs[i]
            for c in range(0, hidden.shape[0], PROMPT_LOGPROBS_ROWS):
                rows = self.runner.logits(hidden[c : c + PROMPT_LOGPROBS_ROWS])  # [<=rows, V]
                targets = seq.token_ids[target + c : target + c + rows.shape[0]]
                seq.prompt_logprobs.extend(tokens_logprobs(rows, targets, seq.params.prompt_logprobs))
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        sampled_seqs = [batch.seqs[i] for i in sampled_idx]
        if self.spec:
            new_tokens = self.spec.verify(logits, sampled_seqs, self.sampler)
        else:
            new_tokens = [[t] for t in self.sampler(logits, sampled_seqs)] if sampled_seqs else []
        if self.block_manager.enable_prefix_caching:
            for seq in batch.seqs:
                self.block_manager.commit_full_blocks(seq)
        now = time.monotonic()
        touched: dict[str, None] = dropped
        structured = self.structured if self.structured is not None and self.structured.matchers else None
        finished, num_generated = SequenceStatus.FINISHED, 0
        for seq, tokens in zip(sampled_seqs, new_tokens):
            if seq.first_token_time is None:
                seq.first_token_time = now
                self.stats["prompt_tokens"] += seq.num_prompt_tokens
                for sibling in self._forks.pop(seq.request_id, ()):
                    self.scheduler.add(sibling)
            for tok in tokens:
                seq.token_ids.append(tok)
                num_generated += 1
                if structured is not None and not structured.accept(seq, tok):
                    seq.finish_reason = "abort"  # the grammar refused a sampled token: never happens with its mask
                    self.scheduler.finish(seq)
                    break
                self._check_finished(seq, tok)
                if seq.status is finished:
                    break
            touched[seq.request_id] = None
        self.stats["generation_tokens"] += num_generated
        if self.spec:
            self.spec.finish_step(sampled_seqs)
        outputs = [self._output(rid) for rid in touched if rid in self._requests]
        self.stats["num_steps"] += 1
        t_end = time.perf_counter()
        self.stats["step_time_s"] += t_end - t0
        if timed:
            step_time.observe(len(batch.seqs), t_end - t_start)
        return outputs

    def _drop_unschedulable(self) -> dict[str, None]:
        """Request ids of sequences the scheduler finished because the KV cache can never hold them (their
        n > 1 siblings still waiting to fork share the prompt, so they finish the same way)."""
        touched: dict[str, None] = {}
        for seq in self.scheduler.take_unschedulable():
            for sibling in self._forks.pop(seq.request_id, ()):
                sibling.status, sibling.finish_reason = seq.status, seq.finish_reason
            touched[seq.request_id] = None
        return touched

    def _check_finished(self, seq: Sequence, tok: int) -> None:
        p = seq.params
        num_out = seq.num_completion_tokens  # runs for every token of every sequence: computed once
        reason = None
        if not p.ignore_eos and tok in self.eos_token_ids and num_out > p.min_tokens:
            reason, seq.stop_reason = "stop", None
        elif tok in p.stop_token_ids and num_out > p.min_tokens:
            reason, seq.stop_reason = "stop", tok
        else:
            detok = self._detok[seq.seq_id]
            if detok.stop or not self._deferred:
                detok.add(tok)
            else:
                detok.pending.append(tok)  # no stop strings: the text waits for the output's consumer
            if detok.stop_hit is not None and num_out >= p.min_tokens:
                reason, seq.stop_reason = "stop", detok.stop_hit
            elif self.structured is not None and self.structured.matchers and self.structured.is_stopped(seq):
                reason, seq.stop_reason = "stop", None  # the grammar is complete
            elif p.max_tokens is not None and num_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                reason = "length"
        if reason:
            seq.finish_reason = reason
            self.scheduler.finish(seq)

    def _output(self, request_id: str) -> RequestOutput | DeferredOutput:
        seqs = self._requests[request_id]
        first = seqs[0]
        done = SequenceStatus.FINISHED  # this runs for every request in every step: plain attributes, no properties
        finished = all(s.status is done for s in seqs)
        prompt_logprobs = None if first.prompt_logprobs is None or first.needs_prompt_logprobs \
            else first.prompt_logprobs
        if self._deferred and not first.params.stop:
            copy = self.spec is not None  # drafts pass through seq.token_ids during a step: the consumer gets a copy
            parts = []
            for seq in seqs:
                detok = self._detok[seq.seq_id]
                new, detok.pending = detok.pending, []
                parts.append((detok, new, len(seq.token_ids) - seq.num_prompt_tokens, seq.status is done,
                              seq.finish_reason, seq.stop_reason, seq.completion_token_ids if copy else None))
            out = DeferredOutput(seqs, parts, finished, first.num_cached_tokens, first.first_token_time,
                                 prompt_logprobs)
        else:
            outs = [completion_output(seq, self._detok[seq.seq_id], seq.num_completion_tokens, seq.is_finished,
                                      seq.finish_reason, seq.stop_reason) for seq in seqs]
            out = request_output(first, outs, finished, first.num_cached_tokens, first.first_token_time,
                                 prompt_logprobs)
        if finished:
            for seq in seqs:
                self._detok.pop(seq.seq_id, None)
                if self.structured is not None:
                    self.structured.free(seq)
            del self._requests[request_id]
        return out
