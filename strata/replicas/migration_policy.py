"""When to migrate (`--enable-migration`): Llumnix's load balancing between replicas, as a pure policy plus the
router's periodic check.

Load metric (Llumnix's freeness, simplified): a replica's free KV blocks per request it holds, running or
queued (its free blocks when it holds none): how far each request's KV can still grow before the replica must
queue or preempt. Every `--migration-interval` seconds the router asks the replicas their loads and pairs the
least free one (the source) with the freest (the target), as Llumnix's balanced pair policy does. It moves one
decoding request when the target's freeness exceeds the source's by more than `--migration-load-threshold` and
the move narrows the gap without reversing it: after the move (the request's blocks freed at the source and
taken at the target) the target must still be at least as free as the source, so two replicas never trade a
request back and forth. The request moved is the source's with the fewest tokens (the least KV to copy); one
that a replica refused to move once (n > 1, structured outputs, no room at the target) is not picked again.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

log = logging.getLogger("strata.router")


def freeness(num_free_blocks: float, num_requests: int) -> float:
    """Free KV blocks per request held (running or queued)."""
    return num_free_blocks / max(num_requests, 1)


@dataclass
class Candidate:
    """A request the policy may move: its id, its replica and the KV blocks it holds there."""

    request_id: str
    replica: int
    num_blocks: int


def plan_migration(loads: dict[int, dict], candidates: list[Candidate], threshold: float) -> tuple[str, int, int] | None:
    """-> (request_id, source, target) of the one migration to start now, or None. `loads`: replica index ->
    {"num_free_blocks", "num_running", "num_waiting"}; `candidates`: the decoding requests that may move."""
    if len(loads) < 2:
        return None

    def free(i: int) -> float:
        load = loads[i]
        return freeness(load["num_free_blocks"], load["num_running"] + load["num_waiting"])

    target = max(loads, key=lambda i: (free(i), -i))
    movable = {c.replica for c in candidates} - {target}
    if not movable:
        return None
    source = min(movable, key=lambda i: (free(i), i))
    gap = free(target) - free(source)
    if gap <= threshold:
        return None
    move = min((c for c in candidates if c.replica == source), key=lambda c: (c.num_blocks, c.request_id))
    src, dst = loads[source], loads[target]
    src_after = freeness(src["num_free_blocks"] + move.num_blocks, src["num_running"] + src["num_waiting"] - 1)
    dst_after = freeness(dst["num_free_blocks"] - move.num_blocks, dst["num_running"] + dst["num_waiting"] + 1)
    if not 0 <= dst_after - src_after < gap:
        return None
    return move.request_id, source, target


class MigrationScheduler:
    """The router's periodic check: loads -> plan_migration -> router.migrate, one migration at a time."""

    def __init__(self, router, config):
        self.router, self.config = router, config
        self.num_checks = 0

    def candidates(self) -> list[Candidate]:
        out = []
        for stream in self.router.streams.values():
            replica = stream.replica
            if replica is None or stream.finished or stream.migration is not None or stream.cannot_migrate \
                    or not stream.num_tokens or replica.is_prefill or replica.dead_reason is not None:
                continue
            blocks = -(-stream.num_computed_tokens // replica.info["block_size"])
            out.append(Candidate(stream.request_id, replica.index, blocks))
        return out

    async def check(self) -> dict | None:
        """One check; -> the migration's result, or None when the loads call for none."""
        from strata.replicas.router import MigrationRefused

        router = self.router
        self.num_checks += 1
        replicas = [r for r in router.live() if not r.is_prefill]
        loads = await router.loads(replicas)
        plan = plan_migration(loads, [c for c in self.candidates() if c.replica in loads],
                              self.config.migration_load_threshold)
        if plan is None:
            return None
        request_id, source, target = plan
        try:
            return await router.migrate(request_id, target)
        except MigrationRefused as e:
            stream = router.streams.get(request_id)
            if stream is not None:
                stream.cannot_migrate = True  # not picked again (n > 1, structured outputs, no room, ...)
            log.info("load-balancing migration of %s from replica %d skipped: %s", request_id, source, e)
            return None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.migration_interval)
            try:
                result = await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a failed check must not stop the next ones
                log.warning("migration check failed: %s", e)
                continue
            if result is not None:
                log.info("migrated %s from replica %d to %d for load balance (%d stages, %.1f ms down)",
                         result["request_id"], result["from"], result["to"], result["stages"],
                         1e3 * result["downtime_s"])
