"""One engine replica as a Ray actor (`strata serve --data-parallel-size N`): an AsyncEngine in the actor's
event loop, its outputs streamed back to the router with a Ray streaming generator.

The actor is an async actor: `generate` is an async generator run as a Ray streaming call, one yielded
RequestOutput per engine step of that request; `load` answers the router's load query from the engine's last
step without waiting for the engine thread. Errors raised in `generate` reach the router as Ray task errors
whose cause is the engine's own exception (router.py unwraps it).
"""

from __future__ import annotations

import asyncio
import os

from strata.config import EngineConfig
from strata.engine.sampling_params import SamplingParams


class EngineReplica:
    """The Ray actor class (router.py wraps it with ray.remote)."""

    def __init__(self, fields: dict, template: str | None = None):
        from strata.engine.llm_engine import LLMEngine
        from strata.server.async_engine import AsyncEngine

        config = EngineConfig(**fields)

        def make_engine() -> LLMEngine:
            engine = LLMEngine(config, progress=False)
            if template is not None and engine.tokenizer is not None:
                engine.tokenizer.chat_template = template
            return engine

        self.engine = AsyncEngine(make_engine)
        self._streams: dict[str, object] = {}  # router request id -> this replica's RequestStream

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
                       timeout: float | None = None):
        stream = self.engine.add_request(prompt_ids, params, request_id, priority, timeout)
        self._streams[request_id] = stream
        try:
            async for out in stream:
                yield out
        finally:
            self._streams.pop(request_id, None)
            stream.abort()  # a no-op once finished; frees the blocks of a request the router gave up on

    def abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.abort()

    def load(self) -> dict:
        return {**self.engine.load(), "dead_reason": self.engine.dead_reason}

    async def call(self, fn):
        return await self.engine.call(fn)

    def shutdown(self) -> None:
        self.engine.shutdown()
