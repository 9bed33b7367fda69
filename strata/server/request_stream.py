"""What a caller of AsyncEngine holds: a request's async output stream, and the errors the engine can raise."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from strata.engine.llm_engine import RequestOutput

if TYPE_CHECKING:
    from strata.server.async_engine import AsyncEngine


class EngineDeadError(RuntimeError):
    """The engine loop stopped; nothing more will be generated."""


class EngineNotReadyError(RuntimeError):
    """The model is still loading."""


class OverloadedError(RuntimeError):
    def __init__(self, num_waiting: int, limit: int):
        super().__init__(f"Server is busy: {num_waiting} requests waiting (limit {limit}). Retry later.")


class RequestTimeoutError(RuntimeError):
    pass


class RequestFailedError(RuntimeError):
    pass


class RequestMigratedError(RuntimeError):
    """The request moved to another engine with its KV; this engine's stream ends here. `migrated`: the
    MigratedRequest of a hand-off (for migrate_out the caller has it)."""

    def __init__(self, message: str, migrated=None):
        super().__init__(message)
        self.migrated = migrated


class RequestStream:
    """Async iterator of RequestOutput for one request; closing it early aborts the request."""

    def __init__(self, owner: AsyncEngine, request_id: str, deadline: float | None):
        self.owner = owner
        self.request_id = request_id
        self.deadline = deadline
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self._held = None  # an item taken from the queue while merging, handed out next

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        if self._held is not None:
            item, self._held = self._held, None
        elif not self.queue.empty():  # an output already there (the usual case under load) needs no wait
            item = self.queue.get_nowait()
        elif self.deadline is None:  # no timer to arm (wait_for's costs more than the get)
            item = await self.queue.get()
        else:
            try:
                item = await asyncio.wait_for(self.queue.get(), max(self.deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                self.abort()
                raise RequestTimeoutError(f"request {self.request_id} exceeded the server's request timeout") \
                    from None
        # Outputs of several steps already waiting go out as one (their deltas joined): a consumer that fell
        # behind the engine catches up in one chunk instead of one per step.
        while isinstance(item, RequestOutput) and not item.finished and not self.queue.empty():
            later = self.queue.get_nowait()
            if not isinstance(later, RequestOutput):
                self._held = later
                break
            item = item.add(later)
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    @property
    def has_pending(self) -> bool:
        """An output is already waiting (the next __anext__ will not wait)."""
        return not self.finished and (self._held is not None or not self.queue.empty())

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.owner.abort(self.request_id)
