"""ReplicaStream: one request's outputs as the server reads them, wherever the request runs.

A request runs in legs: the first on the replica the router chose, each later one on the replica it migrated
to (router.migrate, an admin call), or, with --pd-disaggregation, on a decode replica after the prefill
replica handed it off with its first token (the hand-off's MigratedRequest is that leg's last item). A leg is a Ray streaming call of
EngineReplica.generate; a migrated-away leg ends without a final output, and the next leg resumes with the
MigratedRequest (the KV) on the new replica, so the client's stream goes on unbroken. A replica that dies
before the request's first output hands it to another replica; after it, the stream fails (router.py).
"""

from __future__ import annotations

import asyncio
import time

from strata.engine.migration import MigratedRequest
from strata.server.request_stream import RequestFailedError


class ReplicaStream:
    """Async iterator of RequestOutput for one request served by the replicas; abort() stops it there."""

    def __init__(self, router, request_id: str, args: tuple):
        self.router, self.request_id, self._args = router, request_id, args
        self.finished = False
        self.replica = None  # the replica running the current leg
        self.migration: asyncio.Future | None = None  # set by router.migrate: (replica, MigratedRequest, t0)
        self.resumed: asyncio.Future | None = None  # set here when the next leg's first output arrives
        self.num_outputs = 0
        self.num_tokens = 0  # completion tokens streamed so far
        self.cannot_migrate = False  # its replica refused to move it (n > 1, structured outputs, ...)
        self._gen = self._run()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        try:
            out = await self._gen.__anext__()
        except BaseException:
            self.finished = True
            raise
        if out.finished:
            self.finished = True
            await self._gen.aclose()  # runs its bookkeeping now, not when the generator is collected
        return out

    @property
    def num_computed_tokens(self) -> int:
        """Tokens whose K/V its replica holds, as far as the router knows (the newest token is computed by
        the next step)."""
        return len(self._args[0]) + max(self.num_tokens - 1, 0)

    @property
    def has_pending(self) -> bool:
        """Whether an output is already waiting (as RequestStream.has_pending): never known here, the outputs arrive
        through Ray, so the server writes each chunk as it comes."""
        return False

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.router.abort(self.request_id)
        if not self._gen.ag_running:  # suspended at a yield: close it (a running one is being cancelled)
            try:
                asyncio.get_running_loop().create_task(self._gen.aclose())
            except RuntimeError:  # no event loop: the generator is collected later
                pass

    async def _run(self):
        router = self.router
        prompt_ids, params, priority, timeout = self._args
        t_add, t_last, num_tokens = time.monotonic(), None, 0
        tried: set[int] = set()
        migrated = moved_at = None
        router.streams[self.request_id] = self
        try:
            while True:
                replica = self.replica if migrated is not None else await router.choose(tried, prefill=True)
                self.replica = replica
                blocks = -(-len(prompt_ids) // replica.info["block_size"])
                replica.in_flight += 1
                replica.num_served += migrated is None
                replica.unreported_blocks += blocks
                gen = replica.actor.generate.options(num_returns="streaming").remote(
                    self.request_id, prompt_ids, params, priority, timeout, migrated, replica.is_prefill)
                migrated, reported, ended, handoff = None, False, False, None
                try:
                    async for ref in gen:
                        out = await ref
                        if isinstance(out, MigratedRequest):  # a prefill replica's hand-off: its last item
                            handoff = out
                            break
                        if not reported:
                            reported = True
                            replica.unreported_blocks -= blocks
                            if moved_at is not None:
                                router.migrated(self, time.monotonic() - moved_at)
                                moved_at = None
                        now = time.monotonic()
                        num = sum(len(o.token_ids) for o in out.outputs)
                        if num > num_tokens:
                            if t_last is None:
                                router.metrics.ttft.observe(now - t_add)
                                router.metrics.prompt_tokens.inc(len(prompt_ids))
                            else:
                                router.metrics.itl.observe(now - t_last)
                            router.metrics.generation_tokens.inc(num - num_tokens)
                            t_last, num_tokens = now, num
                            self.num_tokens = num
                        if out.finished:
                            ended = True
                            router.metrics.e2e.observe(now - t_add)
                            for o in out.outputs:
                                router.metrics.finished(o.finish_reason or "abort")
                        self.num_outputs += 1
                        yield out
                        if ended:
                            return
                    ended = True
                    if handoff is not None:  # decode on a decode replica, with the prompt's KV
                        migrated, moved_at = handoff, time.monotonic()
                        self.replica = await router.choose({replica.index}, prefill=False)
                    elif self.migration is not None:  # router.migrate took it out of this replica
                        self.replica, migrated, moved_at = await self.migration
                        self.migration = None
                    else:
                        raise RequestFailedError(f"replica {replica.index} ended the stream before the request "
                                                 "finished")
                except Exception as e:
                    if not router.replica_failed(self, replica, e):
                        raise
                    tried.add(replica.index)  # nothing sent yet: the request goes to another replica
                finally:
                    if not ended and replica.dead_reason is None:
                        replica.cancel(gen)  # the replica's generate ends (its request is aborted there)
                    replica.in_flight -= 1
                    if not reported:
                        replica.unreported_blocks -= blocks
        finally:
            router.streams.pop(self.request_id, None)
            if self.resumed is not None and not self.resumed.done():  # a migration waits for a leg that never came
                self.resumed.set_exception(RequestFailedError(f"request {self.request_id} ended before it resumed "
                                                              "on its new replica"))
