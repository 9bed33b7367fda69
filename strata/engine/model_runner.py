"""ModelRunner: owns the model and the paged KV cache, turns a ScheduledBatch into tensors, runs the forward
and returns the logits of the sequences that finished their pending tokens this step, plus the hidden states
of the prompt positions whose next-token logprobs a request asked for (prompt logprobs; `logits()` turns
them into logits a slice at a time, so a long prompt never holds [prompt, vocab] at once)."""

from __future__ import annotations

import itertools
import time
from array import array
from collections.abc import Callable
from itertools import chain

import torch

from strata.engine.scheduler import ScheduledBatch
from strata.layers import kv_cache
from strata.layers.attention import AttentionMetadata, ContextSlots
from strata.layers.linear import CHUNK_ROWS
from strata.layers.quant_embedding import compute_dtype
from strata.layers.quant_native import native_lib
from strata.models.base import CausalLM


def kv_bytes_per_token(model: CausalLM, dtype: torch.dtype) -> int:
    """Cache bytes of one token over every layer, as the model's KV-cache spec says."""
    return kv_cache.kv_bytes_per_token(model.kv_cache_spec(), dtype)


def num_kv_blocks(model: CausalLM, block_size: int, max_num_seqs: int, max_model_len: int,
                  kv_cache_memory: int) -> int:
    """Blocks for max_num_seqs sequences of max_model_len tokens, at most kv_cache_memory bytes, at least one."""
    per_block = kv_bytes_per_token(model, compute_dtype(model)) * block_size
    wanted = max_num_seqs * ((max_model_len + block_size - 1) // block_size)
    return max(min(wanted, kv_cache_memory // per_block), 1)


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int):
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = compute_dtype(model)
        self.kv_caches = kv_cache.allocate_kv_caches(model.kv_cache_spec(), num_blocks * block_size, self.dtype)
        self._slot_offsets = torch.arange(block_size)

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Cache slots of positions [start, end) of a sequence."""
        first, last = start // self.block_size, (end - 1) // self.block_size + 1
        blocks = torch.tensor(block_table[first:last], dtype=torch.long)
        slots = (blocks[:, None] * self.block_size + self._slot_offsets[None, :]).reshape(-1)  # [nb*bs]
        off = start - first * self.block_size
        return slots[off : off + end - start]

    @torch.inference_mode()
    def warm_up(self, max_tokens: int, budget_s: float) -> list[int]:
        """Prompt forwards of CHUNK_ROWS * k + 1 tokens (at most max_tokens and the cache's slots), k = 1, 2, ...,
        until budget_s has passed, through the path a prompt of that length takes: what is built on first use
        (oneDNN's primitive per row count, 0.4-1.5 ms each: layers/linear.py; the one-call decoder) is built
        before a request waits for it. They write K/V into the first slots of the cache: call it while no
        sequence holds blocks. -> the lengths run."""
        vocab, num_slots = self.model.config.vocab_size, self.num_blocks * self.block_size
        done: list[int] = []
        t0 = last = time.perf_counter()
        for head in range(CHUNK_ROWS, min(max_tokens, num_slots) + 1, CHUNK_ROWS):
            n = min(head + 1, max_tokens, num_slots)
            now = time.perf_counter()
            # the next forward, at the last one's time per token, must end within the budget
            if now - t0 + (now - last) * n / max(done[-1] if done else n, 1) > budget_s:
                break
            last = now
            ids = torch.arange(n) * 7919 % vocab  # [n] many different tokens: the router spreads them over experts
            slots = torch.arange(n)
            meta = AttentionMetadata([0], [n], [n], slots, [slots])
            self.model(ids, torch.arange(n), meta, self.kv_caches, torch.tensor([n - 1]))
            done.append(n)
        return done

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, num_scored: list[int] | None = None,
                before_native: Callable[[], None] | None = None
                ) -> tuple[torch.Tensor, list[int], dict[int, tuple[int, torch.Tensor]]]:
        """Returns (logits [N, V], indices into batch.seqs of the sequences that reached their last token,
        {index into batch.seqs: (first prompt position predicted, final hidden states [k, H])}).

        Each sampled sequence has its last num_scored[i] rows in the logits (default 1; speculative verification
        scores every drafted position). before_native: called once, when the batch's inputs are built, right
        before the forward's layers (CausalLM.forward)."""
        if num_scored is None and all(n == 1 for n in batch.num_new_tokens) and not any(
                s.needs_prompt_logprobs or s.num_computed_tokens + 1 != s.num_tokens for s in batch.seqs):
            return self._execute_decode(batch, before_native), list(range(len(batch.seqs))), {}
        ids, positions, slot_parts, ctx_slots = [], [], [], []
        starts, qlens, clens, sample_rows, sampled = [], [], [], [], []
        prompt_rows: list[int] = []
        prompt_spans: dict[int, tuple[int, int]] = {}  # batch index -> (first target position, rows)
        row = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            s, e = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids.extend(seq.token_ids[s:e])
            positions.append(torch.arange(s, e))
            ctx = self._slots(seq.block_table, 0, e)  # [e]
            slot_parts.append(ctx[s:e])
            ctx_slots.append(ctx)
            if seq.needs_prompt_logprobs:
                # the row of position p predicts token p + 1; skip targets already recorded (recompute after
                # preemption) and stop at the last prompt token
                first = max(s, len(seq.prompt_logprobs) - 1)
                last = min(e, seq.num_prompt_tokens - 1)
                if last > first:
                    prompt_spans[i] = (first + 1, last - first)
                    prompt_rows.extend(range(row + first - s, row + last - s))
            starts.append(row)
            qlens.append(n)
            clens.append(e)
            row += n
            if e == seq.num_tokens:
                sample_rows.extend(range(row - (num_scored[i] if num_scored else 1), row))
                sampled.append(i)
        meta = AttentionMetadata(starts, qlens, clens, torch.cat(slot_parts), ctx_slots)
        out = self.model(
            torch.tensor(ids, dtype=torch.long),
            torch.cat(positions),
            meta,
            self.kv_caches,
            torch.tensor(sample_rows + prompt_rows, dtype=torch.long),
            return_hidden=bool(prompt_rows),
            before_native=before_native,
        )  # [N, V] logits, or with prompt rows [N + P, H] hidden states
        if not prompt_rows:
            return out, sampled, {}
        prompt_hidden, at = {}, len(sample_rows)
        for i, (target, k) in prompt_spans.items():
            prompt_hidden[i] = (target, out[at : at + k])  # [k, H]
            at += k
        return self.logits(out[: len(sample_rows)]), sampled, prompt_hidden

    def _execute_decode(self, batch: ScheduledBatch, before_native: Callable[[], None] | None) -> torch.Tensor:
        """Every sequence decodes its last token: the inputs for the whole batch in one native pass over the block
        tables (decode_slots in cpu_decode_inputs.c; a fixed number of tensor ops without the library), no
        per-sequence tensors, so the step's Python cost stays flat as the batch grows."""
        seqs, bs = batch.seqs, self.block_size
        clens = [s.num_tokens for s in seqs]
        lib = native_lib()
        if lib is None:
            flat, offsets, last, positions = self._decode_slots_torch(seqs, clens)
        else:
            blocks = array("q", chain.from_iterable(s.block_table[: (c + bs - 1) // bs] for s, c in zip(seqs, clens)))
            lens = array("q", clens)
            num = len(seqs)
            flat = torch.empty(sum(clens), dtype=torch.long)  # [sum(clens)] in sequence order
            offsets, last, positions = torch.empty(num + 1, dtype=torch.long), torch.empty(num, dtype=torch.long), \
                torch.empty(num, dtype=torch.long)  # [S + 1], [S], [S]
            lib.decode_slots(blocks.buffer_info()[0], lens.buffer_info()[0], num, bs, flat.data_ptr(),
                             offsets.data_ptr(), last.data_ptr(), positions.data_ptr())
        meta = AttentionMetadata(list(range(len(seqs))), [1] * len(seqs), clens, last, ContextSlots(flat, clens),
                                 _flat=(flat, offsets))
        self.model.current_batch = batch
        return self.model(torch.tensor([s.token_ids[-1] for s in seqs], dtype=torch.long), positions, meta,
                          self.kv_caches, before_native=before_native)  # [S, V]

    def _decode_slots_torch(self, seqs: list, clens: list[int]) -> tuple[torch.Tensor, ...]:
        """decode_slots (cpu_decode_inputs.c) in tensor ops: (flat context slots [sum(clens)], offsets [S + 1],
        each sequence's last slot [S], its new token's position [S])."""
        bs = self.block_size
        nblocks = [(c + bs - 1) // bs for c in clens]
        width = max(nblocks)
        table = torch.tensor([s.block_table[:n] + [0] * (width - n) for s, n in zip(seqs, nblocks)],
                             dtype=torch.long)  # [S, width]
        slots = (table[:, :, None] * bs + self._slot_offsets).reshape(len(seqs), width * bs)  # [S, width*bs]
        lens = torch.tensor(clens, dtype=torch.long)  # [S]
        flat = slots[torch.arange(width * bs)[None, :] < lens[:, None]]  # [sum(clens)] in sequence order
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])  # [S + 1]
        return flat, offsets, flat[offsets[1:] - 1], lens - 1

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [k, H] -> logits [k, V] float32."""
        return self.model.lm_head(hidden).float()

    @torch.inference_mode()
    def embed(self, prompts: list[list[int]]) -> torch.Tensor:
        """Mean of the final-norm hidden states over each prompt's tokens, L2-normalized: [B, H] float32.
        Runs without the KV cache (no blocks taken from running requests)."""
        lens = [len(p) for p in prompts]
        starts = [0, *itertools.accumulate(lens)][:-1]
        meta = AttentionMetadata(starts, lens, lens)
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long)  # [T]
        positions = torch.cat([torch.arange(n) for n in lens])  # [T]
        hidden = self.model(ids, positions, meta, None, return_hidden=True).float()  # [T, H]
        pooled = torch.stack([h.mean(dim=0) for h in hidden.split(lens)])  # [B, H]
        return torch.nn.functional.normalize(pooled, dim=-1)
