"""Live migration of one running request between two replicas (Llumnix): pre-copy stages, then stop-and-copy.

Each pre-copy stage moves the K/V of the tokens the request computed since the previous stage while it keeps
decoding at its source: the source gathers them between two of its steps (EngineReplica.export_kv), and the
target writes them into blocks it reserves for the request (stage_kv); the chunk goes from the source's Ray
object store to the target without passing through the router. When the tokens decoded since the last stage
fit in `last_stage_max_blocks` KV blocks, or after `max_stages - 1` pre-copy stages, the last stage stops the
request at the source (migrate_out, carrying only the K/V not copied yet) and its next leg resumes on the target
(replica_stream.py), which adopts the staged blocks. `max_stages = 1` is a plain stop-and-copy of the whole KV.

The downtime is the last stage: from stopping the request at the source to its first output on the target
(`strata:migration_downtime_seconds`), the one longer gap between two tokens the client sees. A migration given
up before the last stage (the request finished or was aborted meanwhile, the target has no room) frees the
target's staged blocks and leaves the request where it runs.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from strata.config import knob


@dataclass
class MigrationConfig:
    """Migration of running requests between replicas (`strata serve --data-parallel-size N`)."""

    enable_migration: bool = knob(False, "with --data-parallel-size N: move running requests from the most to the "
                                         "least loaded replica when their load differs by more than "
                                         "--migration-load-threshold (Llumnix); /admin/migrate works without it")
    migration_load_threshold: float = knob(8.0, "free KV blocks per request (running or queued) by which the least "
                                                "loaded replica must exceed the most loaded one for a migration",
                                           type=float)
    migration_interval: float = knob(0.5, "seconds between two checks of the replicas' loads", type=float)
    migration_max_stages: int = knob(3, "stages of a migration: pre-copy stages while the request decodes, then "
                                        "the stop-and-copy; 1 = stop-and-copy of the whole KV", type=int)
    migration_last_stage_max_blocks: int = knob(1, "KV blocks left to copy at most before the stop-and-copy "
                                                   "(fewer: a shorter pause)", type=int)

    def check(self) -> None:
        from strata.errors import ConfigError

        if self.migration_max_stages < 1:
            raise ConfigError(f"--migration-max-stages must be >= 1, got {self.migration_max_stages}")
        if self.migration_last_stage_max_blocks < 0:
            raise ConfigError("--migration-last-stage-max-blocks must be >= 0, got "
                              f"{self.migration_last_stage_max_blocks}")
        if not self.migration_interval > 0:
            raise ConfigError(f"--migration-interval must be > 0 seconds, got {self.migration_interval}")


async def migrate(router, stream, src, dest, max_stages: int, last_stage_max_blocks: int) -> dict:
    """Move `stream`'s request from replica `src` to `dest`; -> {request_id, from, to, downtime_s, stages,
    num_precopied_tokens, num_stopped_tokens}. Raises MigrationRefused where the request stays."""
    from strata.replicas.router import MigrationRefused, _cause
    from strata.server.request_stream import RequestFailedError

    rid = stream.request_id
    loop = asyncio.get_running_loop()
    stream.migration, stream.resumed = loop.create_future(), loop.create_future()
    staged = {"num_tokens": 0, "num_preemptions": None}
    stages, last_stage_tokens = 1, last_stage_max_blocks * src.info["block_size"]
    try:
        while stages < max_stages and stream.num_computed_tokens - staged["num_tokens"] > last_stage_tokens:
            chunk = src.actor.export_kv.remote(rid, staged["num_tokens"], staged["num_preemptions"])
            staged = await dest.actor.stage_kv.remote(rid, chunk)
            stages += 1
        t0 = time.monotonic()
        payload = await src.actor.migrate_out.remote(rid, staged["num_tokens"], staged["num_preemptions"])
    except Exception as e:  # noqa: BLE001 - the request stays where it is
        stream.migration = None
        if stream.resumed.done():  # the stream ended meanwhile (replica_stream.py settled it)
            stream.resumed.exception()
        if max_stages > 1:  # a stage may have reserved blocks before it failed
            try:
                await dest.actor.drop_staged.remote(rid)
            except Exception:  # noqa: BLE001, S110 - a dead target holds no blocks
                pass
        raise MigrationRefused(f"request {rid!r} cannot migrate: {_cause(e)}") from None
    stream.migration.set_result((dest, payload, t0))
    try:
        downtime = await stream.resumed
    except RequestFailedError as e:  # its stream has ended with this error
        raise MigrationRefused(f"request {rid!r} left replica {src.index} and failed to resume on replica "
                               f"{dest.index}: {e}") from None
    return {"request_id": rid, "from": src.index, "to": dest.index, "downtime_s": downtime, "stages": stages,
            "num_precopied_tokens": payload.kv_start,
            "num_stopped_tokens": payload.num_computed_tokens - payload.kv_start}
