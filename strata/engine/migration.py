"""Moving a running request between two engines with its KV cache (live migration, prefill/decode hand-off).

`export_request` takes a decoding request out of one engine between two steps: its tokens, sampling state
(the seeded generator's state, logprobs so far), the detokenizer's state and the K/V of its computed tokens,
gathered from its blocks; the request is then dropped there and its blocks freed. `import_request` puts it
into another engine of the same model: fresh blocks (a prompt prefix already in that engine's prefix cache is
shared, as for any admission), the K/V written into them, the sequence added as running. The next step
computes the newest token and samples on, so the continuation is the one the first engine would have made.

Live migration (Llumnix) copies most of the KV before the request stops: `export_kv` gathers the K/V of the
tokens computed since the previous stage while the request keeps decoding at its source, `stage_kv`
(migration_staging.py) writes them into blocks the target reserves for it; the last stage is
`export_request(kv_from=...)` with only the K/V not copied yet, and `import_request(staged=...)` adopts the
staged blocks. The K/V of a computed token never changes, unless the request is preempted (recomputed): the
stages carry its preemption count, and a request preempted in between sends its whole KV again.

Requests that cannot move, refused with one line: n > 1 (siblings share blocks), structured outputs (the
grammar matcher's state stays in its engine), speculative decoding, a prompt not fully computed yet, a
tensor-parallel engine (its cache holds one rank's heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.engine.detokenizer import IncrementalDetokenizer
from strata.engine.sampling_params import SamplingParams
from strata.engine.sequence import Sequence, SequenceStatus
from strata.errors import InvalidRequestError


class MigrationError(InvalidRequestError):
    """A request that cannot be moved (finished, unknown, or of a kind that does not migrate)."""


@dataclass
class MigratedRequest:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    priority: int
    num_computed_tokens: int
    kv: torch.Tensor  # [L, 2, num_computed_tokens, Hkv, D]
    detokenizer: dict  # IncrementalDetokenizer's fields but the tokenizer
    logprobs: list[dict]
    prompt_logprobs: list | None
    generator_state: torch.Tensor | None
    num_cached_tokens: int
    arrival_time: float
    first_token_time: float | None
    kv_start: int = 0  # `kv` holds tokens [kv_start, num_computed_tokens); those before are staged at the target
    num_preemptions: int = 0


@dataclass
class KVChunk:
    """One pre-copy stage: the K/V of tokens [start, end) of a request that keeps decoding at its source."""

    request_id: str
    token_ids: list[int]  # the request's first `end` tokens
    num_prompt_tokens: int
    start: int
    end: int
    num_preemptions: int
    kv: torch.Tensor | None = None  # [L, 2, end - start, Hkv, D], once gathered
    slots: torch.Tensor | None = None  # [end - start] where the source holds them, until gathered


def _slots(block_table: list[int], block_size: int, num_tokens: int) -> torch.Tensor:
    blocks = torch.tensor(block_table, dtype=torch.long)
    slots = (blocks[:, None] * block_size + torch.arange(block_size)[None, :]).reshape(-1)  # [nb*bs]
    return slots[:num_tokens]


def _check_engine(engine) -> None:
    if engine.config.tensor_parallel_size > 1:
        raise MigrationError("requests of a tensor-parallel engine cannot migrate")
    if engine.spec is not None:
        raise MigrationError("requests of an engine with speculative decoding cannot migrate")


def _gather(engine, slots: torch.Tensor) -> torch.Tensor:
    """K/V of the given cache slots -> [L, 2, n, Hkv, D] (one copy)."""
    caches = engine.runner.kv_caches
    out = torch.empty((len(caches), 2, len(slots), *caches[0][0].shape[1:]), dtype=caches[0][0].dtype)
    for layer, (k, v) in enumerate(caches):
        torch.index_select(k, 0, slots, out=out[layer, 0])
        torch.index_select(v, 0, slots, out=out[layer, 1])
    return out


def _seq_slots(engine, seq: Sequence, start: int) -> torch.Tensor:
    return _slots(seq.block_table, engine.block_manager.block_size, seq.num_computed_tokens)[start:]


def _decoding_seq(engine, request_id: str) -> Sequence:
    _check_engine(engine)
    seqs = engine._requests.get(request_id)
    if not seqs:
        raise MigrationError(f"request {request_id!r} is not running here")
    if len(seqs) != 1 or request_id in engine._forks:
        raise MigrationError(f"request {request_id!r} has n > 1 sequences; only n = 1 migrates")
    seq = seqs[0]
    if seq.is_finished or seq.status != SequenceStatus.RUNNING or seq.num_computed_tokens < seq.num_prompt_tokens:
        raise MigrationError(f"request {request_id!r} is not decoding (waiting, prefilling or finished)")
    if seq.params.structured_outputs is not None:
        raise MigrationError(f"request {request_id!r} has structured outputs; its grammar state cannot move")
    return seq


def plan_kv(engine, request_id: str, start: int = 0, num_preemptions: int | None = None) -> KVChunk:
    """A pre-copy stage's tokens (call between steps): those the request computed from `start` on, from 0 when
    it was preempted since the stage that counted `num_preemptions`; gather_kv reads their K/V."""
    seq = _decoding_seq(engine, request_id)
    if num_preemptions is not None and seq.num_preemptions != num_preemptions:
        start = 0
    start = min(start, seq.num_computed_tokens)
    return KVChunk(request_id, seq.token_ids[: seq.num_computed_tokens], seq.num_prompt_tokens, start,
                   seq.num_computed_tokens, seq.num_preemptions, slots=_seq_slots(engine, seq, start))


def gather_kv(engine, chunk: KVChunk) -> KVChunk:
    """Read a planned stage's K/V; safe beside the engine's steps (the request keeps decoding): a computed
    token's slot is not written again while the request holds its block. If the request leaves (finished,
    aborted) its last stage fails and the migration is given up; if it is preempted, the last stage sends its
    whole KV (the preemption count differs), so K/V read from a block already reused are never used."""
    chunk.kv, chunk.slots = _gather(engine, chunk.slots), None
    return chunk


def export_kv(engine, request_id: str, start: int = 0, num_preemptions: int | None = None) -> KVChunk:
    """A pre-copy stage (call between steps): plan_kv and gather_kv at once."""
    return gather_kv(engine, plan_kv(engine, request_id, start, num_preemptions))


def export_request(engine, request_id: str, kv_from: int = 0, num_preemptions: int | None = None) -> MigratedRequest:
    """Take a decoding request out of `engine` (call between steps) with the K/V of its tokens from `kv_from` on
    (those before were staged at the target; all of them when it was preempted since); it is dropped here."""
    seq = _decoding_seq(engine, request_id)
    if num_preemptions is not None and seq.num_preemptions != num_preemptions:
        kv_from = 0
    kv_from = min(kv_from, seq.num_computed_tokens)
    kv = _gather(engine, _seq_slots(engine, seq, kv_from))  # [L, 2, n - kv_from, Hkv, D]
    detok = engine.detokenizer_state(seq)
    out = MigratedRequest(request_id, list(seq.token_ids), seq.num_prompt_tokens, seq.params, seq.priority,
                          seq.num_computed_tokens, kv, detok, list(seq.logprobs),
                          None if seq.prompt_logprobs is None else list(seq.prompt_logprobs),
                          None if seq.generator is None else seq.generator.get_state(), seq.num_cached_tokens,
                          seq.arrival_time, seq.first_token_time, kv_from, seq.num_preemptions)
    engine.abort_request(request_id)
    return out


def write_kv(engine, block_table: list[int], start: int, kv: torch.Tensor) -> None:
    """Write kv [L, 2, n, Hkv, D] into the slots of tokens [start, start + n) of `block_table`."""
    slots = _slots(block_table, engine.block_manager.block_size, start + kv.shape[2])[start:]
    for (k, v), layer in zip(engine.runner.kv_caches, kv, strict=True):
        k[slots] = layer[0].to(k.dtype)
        v[slots] = layer[1].to(v.dtype)


def import_request(engine, m: MigratedRequest, request_id: str | None = None, staged=None) -> str:
    """Add a migrated request to `engine` as running, its KV in fresh blocks; -> its request id here.
    `staged` (migration_staging.StagedKV): the pre-copy stages' blocks, holding tokens [0, m.kv_start); they
    are adopted, or freed when the import fails."""
    try:
        return _import(engine, m, request_id, staged)
    except BaseException:
        if staged is not None and staged.seq.block_table:
            engine.block_manager.free(staged.seq)
        raise


def _import(engine, m: MigratedRequest, request_id: str | None, staged) -> str:
    _check_engine(engine)
    rid = request_id or m.request_id
    if rid in engine._requests:
        raise MigrationError(f"request {rid!r} already runs here")
    cfg = engine.model_config
    want = (cfg.num_hidden_layers, 2, m.num_computed_tokens - m.kv_start, cfg.num_key_value_heads, cfg.head_dim)
    if tuple(m.kv.shape) != want:
        raise MigrationError(f"migrated KV has shape {list(m.kv.shape)}, this engine's model expects {list(want)}")
    if len(m.token_ids) > engine.max_model_len:
        raise MigrationError(f"request {rid!r} has {len(m.token_ids)} tokens, above max_model_len "
                             f"{engine.max_model_len}")
    num_staged = 0 if staged is None else staged.num_tokens
    if m.kv_start and (num_staged != m.kv_start or staged.num_preemptions != m.num_preemptions):
        raise MigrationError(f"request {rid!r} brings its KV from token {m.kv_start} on, but {num_staged} tokens "
                             "are staged here")
    scheduler, bm = engine.scheduler, engine.block_manager
    if len(scheduler.running) >= scheduler.max_num_seqs:
        raise MigrationError(f"no room for request {rid!r}: {scheduler.max_num_seqs} sequences already run")
    if staged is not None and not m.kv_start:  # the whole KV came again (preempted at the source meanwhile)
        bm.free(staged.seq)
        staged = None
    seq = Sequence(rid, m.token_ids[: m.num_prompt_tokens], m.params, priority=m.priority)
    seq.token_ids = list(m.token_ids)
    if staged is None:
        if not bm.can_allocate(seq):
            raise MigrationError(f"no room for request {rid!r}: {bm.num_free_blocks} free KV blocks")
        bm.allocate(seq)  # a prefix already cached here is shared; its K/V are this engine's own
        start = min(seq.num_computed_tokens, m.num_computed_tokens)
    else:
        if bm.blocks_needed(seq.num_tokens) - len(staged.seq.block_table) > bm.num_free_blocks:
            raise MigrationError(f"no room for request {rid!r}: {bm.num_free_blocks} free KV blocks")
        seq.block_table, staged.seq.block_table = staged.seq.block_table, []
        seq.num_hashed_blocks = staged.seq.num_hashed_blocks
        bm.append_slot(seq)
        start = m.kv_start
    write_kv(engine, seq.block_table, start, m.kv[:, :, start - m.kv_start:])
    seq.num_computed_tokens = m.num_computed_tokens
    seq.num_cached_tokens = m.num_cached_tokens
    seq.logprobs, seq.prompt_logprobs = list(m.logprobs), m.prompt_logprobs
    seq.arrival_time, seq.first_token_time = m.arrival_time, m.first_token_time
    if m.generator_state is not None:
        seq.generator.set_state(m.generator_state)
    seq.status = SequenceStatus.RUNNING
    bm.commit_full_blocks(seq)
    detok = IncrementalDetokenizer.__new__(IncrementalDetokenizer)
    vars(detok).update({**m.detokenizer, "tokenizer": engine.tokenizer})
    engine._requests[rid] = [seq]
    engine._detok[seq.seq_id] = detok
    scheduler.running.append(seq)
    return rid
