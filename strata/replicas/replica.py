"""One engine replica as a Ray actor (`strata serve --data-parallel-size N`): an AsyncEngine in the actor's
event loop, its outputs streamed back to the router with a Ray streaming generator.

The actor is an async actor: `generate` is an async generator run as a Ray streaming call, one yielded
RequestOutput per engine step of that request; `load` answers the router's load query from the engine's last
step without waiting for the engine thread. Live migration (strata/replicas/live_migration.py): `export_kv` gives
a pre-copy stage of a request that keeps decoding here, `stage_kv` writes one into blocks reserved on the target
(`drop_staged` frees them when the migration is given up), `migrate_out` hands the request over with the K/V not
copied yet, and `generate(..., migrated=...)` goes on with it on the target, adopting the staged blocks. Errors
raised in `generate` reach the router as Ray task errors whose cause is the engine's own exception (router.py
unwraps it).
"""

from __future__ import annotations

import asyncio
import os

from strata.config import EngineConfig
from strata.engine.sampling_params import SamplingParams


class EngineReplica:
    """The Ray actor class (router.py wraps it with ray.remote)."""

    def __init__(self, fields: dict, template: str | None = None, stream_interval_ms: float = 0.0):
        from strata.engine.llm_engine import LLMEngine
        from strata.server.async_engine import AsyncEngine

        config = EngineConfig(**fields)

        def make_engine() -> LLMEngine:
            engine = LLMEngine(config, progress=False)
            if template is not None and engine.tokenizer is not None:
                engine.tokenizer.chat_template = template
            return engine

        # outputs reach `generate` (and Ray's stream to the router) at most once per interval, merged
        self.engine = AsyncEngine(make_engine, stream_interval_ms=stream_interval_ms)
        self._streams: dict[str, object] = {}  # router request id -> this replica's RequestStream
        self._staged: dict[str, object] = {}  # router request id -> pre-copied KV (migration_staging.StagedKV)

    async def start(self) -> dict:
        """Start the engine thread and wait for the model; -> the facts the router needs."""
        self.engine.start(asyncio.get_running_loop())
        while self.engine.engine is None and self.engine.dead_reason is None:
            await asyncio.sleep(0.05)
        if self.engine.dead_reason is not None:
            raise RuntimeError(self.engine.dead_reason)
        eng = self.engine.engine
        return {"max_model_len": eng.max_model_len, "block_size": eng.config.block_size, "pid": os.getpid()}

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, priority: int = 0,
                       timeout: float | None = None, migrated=None, handoff: bool = False):
        """Outputs of a new request, or of one migrated here (`migrated`: a MigratedRequest). A request
        migrated away (migrate_out) ends its stream without a final output; with `handoff` (a prefill replica)
        the request leaves after its first token and the last item is its MigratedRequest."""
        from strata.server.request_stream import RequestMigratedError

        if migrated is not None:  # the router awaited every stage_kv before this call: nothing stages now
            stream = self.engine.resume_request(migrated, request_id, timeout, self._staged.pop(request_id, None))
        else:
            stream = self.engine.add_request(prompt_ids, params, request_id, priority, timeout, handoff)
        self._streams[request_id] = stream
        try:
            async for out in stream:
                yield out
        except RequestMigratedError as e:
            if e.migrated is not None:
                yield e.migrated
        finally:
            self._streams.pop(request_id, None)
            stream.abort()  # a no-op once finished; frees the blocks of a request the router gave up on

    def abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.abort()

    def _engine_id(self, request_id: str) -> str:
        from strata.engine.migration import MigrationError

        stream = self._streams.get(request_id)
        if stream is None:
            raise MigrationError(f"request {request_id!r} is not running on this replica")
        return stream.request_id

    async def migrate_out(self, request_id: str, kv_from: int = 0, num_preemptions: int | None = None):
        """-> the MigratedRequest of a request decoding here, with its K/V from token `kv_from` on (its
        generate call ends)."""
        return await self.engine.migrate_out(self._engine_id(request_id), kv_from, num_preemptions)

    async def export_kv(self, request_id: str, start: int = 0, num_preemptions: int | None = None):
        """A pre-copy stage (migration.KVChunk) of a request that keeps decoding here: its tokens fixed between
        two steps, their K/V read in another thread while the engine steps on."""
        from strata.engine.migration import gather_kv, plan_kv

        rid = self._engine_id(request_id)
        chunk = await self.engine.call(lambda eng: plan_kv(eng, rid, start, num_preemptions))
        return await asyncio.to_thread(gather_kv, self.engine.engine, chunk)

    async def stage_kv(self, request_id: str, chunk) -> dict:
        """Write a pre-copy stage into blocks reserved here (reserved between two steps, written in another
        thread while the engine steps on); -> {"num_tokens", "num_preemptions"} staged."""
        from strata.engine.migration_staging import reserve_stage, write_stage

        staged, first = await self.engine.call(lambda eng: reserve_stage(eng, self._staged.get(request_id), chunk))
        self._staged[request_id] = staged
        await asyncio.to_thread(write_stage, self.engine.engine, staged, chunk, first)
        return {"num_tokens": staged.num_tokens, "num_preemptions": staged.num_preemptions}

    async def drop_staged(self, request_id: str) -> None:
        from strata.engine.migration_staging import drop_staged

        staged = self._staged.pop(request_id, None)
        if staged is not None:
            await self.engine.call(lambda eng: drop_staged(eng, staged))

    def load(self) -> dict:
        return {**self.engine.load(), "dead_reason": self.engine.dead_reason}

    async def call(self, fn):
        return await self.engine.call(fn)

    def shutdown(self) -> None:
        self.engine.shutdown()
