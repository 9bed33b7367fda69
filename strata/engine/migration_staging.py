"""The target's side of a live migration's pre-copy stages: K/V written into blocks reserved for a request that
still decodes at its source (Llumnix's pre-allocation on the destination).

`stage_kv` takes one stage's KVChunk (migration.export_kv at the source): the first stage allocates blocks for
the tokens it covers (a prompt prefix this engine already caches is shared, as for any admission) and writes
the rest; each later stage extends the blocks and writes the tokens decoded since. The staged blocks belong to
no scheduled sequence: they count as used, so the router sees the incoming request's load, and nothing runs on
them until `migration.import_request(staged=...)` adopts them with the last stage. `drop_staged` frees them when
the migration is given up (the request finished or failed at its source, or the source refused it). Every call
runs in the engine's thread between two steps, like export and import.
"""

from __future__ import annotations

from dataclasses import dataclass

from strata.engine.migration import KVChunk, MigrationError, _check_engine, write_kv
from strata.engine.sampling_params import SamplingParams
from strata.engine.sequence import Sequence


@dataclass
class StagedKV:
    seq: Sequence  # holds the reserved blocks; num_computed_tokens = tokens whose K/V are written
    num_preemptions: int  # the source's preemption count of the request when the stages began

    @property
    def num_tokens(self) -> int:
        return self.seq.num_computed_tokens


def stage_kv(engine, staged: StagedKV | None, chunk: KVChunk) -> StagedKV:
    """Write one pre-copy stage into this engine's blocks (call between steps); -> the request's staged KV."""
    staged, first = reserve_stage(engine, staged, chunk)
    write_stage(engine, staged, chunk, first)
    return staged


def reserve_stage(engine, staged: StagedKV | None, chunk: KVChunk) -> tuple[StagedKV, int]:
    """The blocks for one stage (call between steps); -> the staged request and the first token write_stage
    writes (a prefix-cache hit is not written again)."""
    _check_engine(engine)
    cfg, rid = engine.model_config, chunk.request_id
    want = (cfg.num_hidden_layers, 2, chunk.end - chunk.start, cfg.num_key_value_heads, cfg.head_dim)
    if tuple(chunk.kv.shape) != want:
        raise MigrationError(f"pre-copied KV has shape {list(chunk.kv.shape)}, this engine's model expects "
                             f"{list(want)}")
    if staged is not None and (chunk.start == 0 or chunk.num_preemptions != staged.num_preemptions):
        drop_staged(engine, staged)  # the source sends everything again (it recomputed the request)
        staged = None
    bm = engine.block_manager
    if staged is None:
        if chunk.start != 0:
            raise MigrationError(f"request {rid!r}: a pre-copy stage from token {chunk.start} with nothing staged")
        seq = Sequence(rid, chunk.token_ids[: chunk.num_prompt_tokens], SamplingParams())
        seq.token_ids = list(chunk.token_ids)
        if not bm.can_allocate(seq):
            raise MigrationError(f"no room to stage request {rid!r}: {bm.num_free_blocks} free KV blocks")
        bm.allocate(seq)
        staged = StagedKV(seq, chunk.num_preemptions)
        first = min(seq.num_computed_tokens, chunk.end)
    else:
        if chunk.start != staged.num_tokens:
            raise MigrationError(f"request {rid!r}: a pre-copy stage from token {chunk.start}, but "
                                 f"{staged.num_tokens} tokens are staged")
        staged.seq.token_ids = list(chunk.token_ids)
        if not bm.reserve(staged.seq, chunk.end):
            raise MigrationError(f"no room to stage request {rid!r}: {bm.num_free_blocks} free KV blocks")
        first = chunk.start
    return staged, first


def write_stage(engine, staged: StagedKV, chunk: KVChunk, first: int) -> None:
    """Write a reserved stage's K/V; safe beside the engine's steps, since no scheduled sequence holds the
    staged blocks (the next stage's reserve_stage waits for this)."""
    write_kv(engine, staged.seq.block_table, first, chunk.kv[:, :, first - chunk.start:])
    staged.seq.num_computed_tokens = chunk.end


def drop_staged(engine, staged: StagedKV | None) -> None:
    """Free the blocks of a migration given up."""
    if staged is not None and staged.seq.block_table:
        engine.block_manager.free(staged.seq)
