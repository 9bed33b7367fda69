"""ReplicaRouter: N engine replicas as Ray actors behind one OpenAI server (`--data-parallel-size N`).

The router stands where the server's AsyncEngine stands (same add_request / stream / abort / call / health
surface), so the API layer is the same for one engine and for N. Ray starts a local cluster when no
`--ray-address` is given.

Routing (Llumnix's load metric, simplified): each request goes to the live replica with the most free KV
blocks, less the prompt blocks of requests sent to it that it has not reported yet; ties go to the one with
the fewest requests in flight from this router. The load query is one Ray call per replica, in parallel.

Faults: a replica whose actor dies (a crash, a kill) is marked dead the first time a call to it fails and
gets no more requests. Its requests that had produced no output yet are sent to another replica (the client
sees nothing); those already streaming end with an error event (`RequestFailedError` naming the replica),
since their tokens cannot be replayed without the replica's state. /health answers 200 with
`"status": "degraded"` while some replicas are dead, 503 when all are.

Migration: `migrate` moves a running request with its KV (live_migration.py: pre-copy stages, then a short
stop-and-copy), on /admin/migrate or, with --enable-migration, when the replicas' loads differ
(migration_policy.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from strata.config import EngineConfig
from strata.errors import ConfigError, StrataError
from strata.replicas import live_migration
from strata.replicas.live_migration import MigrationConfig
from strata.replicas.migration_policy import MigrationScheduler
from strata.replicas.replica_stream import ReplicaStream
from strata.server.metrics import EngineMetrics
from strata.server.request_stream import EngineDeadError, EngineNotReadyError, RequestFailedError

log = logging.getLogger("strata.router")
LOAD_TIMEOUT_S = 10.0  # a replica that does not answer a load query in this time is taken for dead


class ReplicaDeadError(StrataError):
    """A replica's actor died."""


class MigrationRefused(StrataError):
    """A migration that cannot happen (no such running request, no other replica, a request that cannot move)."""


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--data-parallel-size > 1 needs Ray: pip install 'strata[distributed]'") from None
    return ray


def _cause(err: BaseException) -> BaseException:
    """The engine's own exception inside a Ray task error, or a ReplicaDeadError for a dead actor."""
    try:
        import ray
    except ImportError:
        return err
    if isinstance(err, ray.exceptions.RayActorError):
        return ReplicaDeadError(str(err).splitlines()[0])
    if isinstance(err, ray.exceptions.RayTaskError) and isinstance(err.cause, BaseException):
        return _cause(err.cause)  # a task whose argument came from a failed task wraps that task's error
    return err


class EngineFacts:
    """What the API layer reads from `engine.engine` when the engines live in the replicas: the tokenizer,
    the model config and max_model_len (a replica's, so the limits are the ones the replicas apply)."""

    def __init__(self, config: EngineConfig, max_model_len: int, template: str | None):
        import os

        from strata.engine.llm_engine import BUNDLED_MODEL
        from strata.models.registry import load_config
        from strata.tokenizer import Tokenizer
        from strata.weights.gguf_cache import resolve_model_path

        path = resolve_model_path(config.model or BUNDLED_MODEL, False)
        self.model_path, self.max_model_len, self.config = path, max_model_len, config
        self.model_config = load_config(path)
        tok = config.tokenizer or path
        self.tokenizer = Tokenizer(tok) if config.tokenizer or os.path.exists(os.path.join(path, "tokenizer.json")) \
            else None
        if template is not None and self.tokenizer is not None:
            self.tokenizer.chat_template = template


class _Replica:
    def __init__(self, index: int, actor):
        self.index, self.actor = index, actor
        self.info: dict = {}
        self.dead_reason: str | None = None
        self.is_prefill = False  # --pd-disaggregation: takes new requests, hands them to decode replicas
        self.in_flight = 0
        self.num_served = 0  # requests sent to it
        self.unreported_blocks = 0  # prompt blocks of requests sent that have not produced output yet

    def cancel(self, gen) -> None:
        """Stop a generate call whose consumer went away (its request is aborted in the replica)."""
        _ray().cancel(gen)


class ReplicaRouter:
    def __init__(self, config: EngineConfig, num_replicas: int, ray_address: str | None = None,
                 metrics: EngineMetrics | None = None, request_timeout: float | None = None,
                 chat_template: str | None = None, on_load_failure=None, pd_disaggregation: bool = False,
                 migration: MigrationConfig | None = None, stream_interval_ms: float = 0.0):
        if config.tensor_parallel_size > 1:
            raise ConfigError("--data-parallel-size > 1 with --tensor-parallel-size > 1 is not supported yet")
        if pd_disaggregation and num_replicas < 2:
            raise ConfigError("--pd-disaggregation needs --data-parallel-size >= 2 (prefill and decode replicas)")
        self.config, self.num_replicas, self.ray_address = config, num_replicas, ray_address
        self.pd_disaggregation = pd_disaggregation
        self.stream_interval_ms = stream_interval_ms  # each replica's hand-off of outputs (serve's --stream-interval-ms)
        self.migration = migration or MigrationConfig()
        self.migration.check()
        self._policy_task: asyncio.Task | None = None
        self.streams: dict[str, ReplicaStream] = {}
        self.metrics = metrics or EngineMetrics()
        self.request_timeout, self.template, self._on_load_failure = request_timeout, chat_template, on_load_failure
        self.engine = None  # the local LLMEngine-like facts the API reads: tokenizer, model_config, max_model_len
        self.replicas: list[_Replica] = []
        self.placed: dict[str, _Replica] = {}
        self._dead_reason: str | None = None
        self._ids = itertools.count()
        self._task: asyncio.Task | None = None
        self._started_ray = False
        from prometheus_client import Gauge

        self._healthy = Gauge("strata:replica_healthy", "1 while the replica serves, 0 once it died",
                              ["model_name", "replica"], registry=self.metrics.registry)
        self._in_flight = Gauge("strata:replica_num_requests", "Requests in flight on the replica",
                                ["model_name", "replica"], registry=self.metrics.registry)
        from prometheus_client import Counter, Histogram

        from strata.server.metrics import LATENCY_BUCKETS

        self._migrations = Counter("strata:migrations", "Requests moved to another replica with their KV",
                                   ["model_name"], registry=self.metrics.registry).labels(self.metrics.model_name)
        self._downtime = Histogram("strata:migration_downtime_seconds", "From a migration's start to the "
                                   "request's first output on its new replica", ["model_name"],
                                   buckets=LATENCY_BUCKETS, registry=self.metrics.registry
                                   ).labels(self.metrics.model_name)

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self._start())

    async def _start(self) -> None:
        try:
            await self._launch()
        except Exception as e:  # noqa: BLE001 - reported on /health and to serve, like a model load failure
            err = _cause(e)
            log.error("replicas failed to start: %s", err)
            self._dead_reason = f"replicas failed to start: {err}"
            if self._on_load_failure is not None:
                self._on_load_failure(str(err))

    async def _launch(self) -> None:
        import dataclasses

        from strata.replicas.replica import EngineReplica

        ray = _ray()
        if not ray.is_initialized():
            self._started_ray = True
            await asyncio.to_thread(ray.init, address=self.ray_address, include_dashboard=False,
                                    log_to_driver=False, configure_logging=False)
        actor_cls = ray.remote(EngineReplica)
        fields = dataclasses.asdict(self.config)
        threads = self.config.num_threads or 1
        self.replicas = [_Replica(i, actor_cls.options(num_cpus=0, max_concurrency=1000).remote(
            {**fields, "num_threads": threads}, self.template, self.stream_interval_ms))
            for i in range(self.num_replicas)]
        infos = await asyncio.gather(*(r.actor.start.remote() for r in self.replicas))
        for r, info in zip(self.replicas, infos, strict=True):
            r.info = info
            r.is_prefill = self.pd_disaggregation and r.index < max(len(self.replicas) // 2, 1)
            self._healthy.labels(self.metrics.model_name, str(r.index)).set(1)
        self.engine = await asyncio.to_thread(EngineFacts, self.config, infos[0]["max_model_len"],
                                              self.template)
        log.info("%d replicas ready (pids %s)", len(infos), [i["pid"] for i in infos])
        if self.migration.enable_migration:
            self._policy_task = asyncio.get_running_loop().create_task(MigrationScheduler(self, self.migration).run())

    @property
    def dead_reason(self) -> str | None:
        if self._dead_reason is None and self.replicas and not self.live():
            return "every replica has died"
        return self._dead_reason

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and self.dead_reason is None

    @property
    def num_unfinished(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._policy_task is not None:
            try:
                self._policy_task.get_loop().call_soon_threadsafe(self._policy_task.cancel)
            except RuntimeError:  # its event loop is closed: the task went with it
                pass
        ray = _ray()
        for r in self.replicas:
            if r.dead_reason is None:
                try:
                    ray.get(r.actor.shutdown.remote(), timeout=timeout)
                except Exception:  # noqa: BLE001, S110 - already gone; killed below
                    pass
            ray.kill(r.actor)
        if self._started_ray:
            ray.shutdown()

    def health(self) -> dict:
        live = self.live()
        return {"status": "ok" if len(live) == len(self.replicas) else "degraded",
                "replicas": [{"index": r.index, "healthy": r.dead_reason is None, "pid": r.info.get("pid"),
                              **({"role": "prefill" if r.is_prefill else "decode"} if self.pd_disaggregation
                                 else {}),
                              "num_requests": r.in_flight, "num_served": r.num_served,
                              **({"error": r.dead_reason} if r.dead_reason else {})} for r in self.replicas]}

    # ---- routing --------------------------------------------------------------------------------
    def live(self) -> list[_Replica]:
        return [r for r in self.replicas if r.dead_reason is None]

    def mark_dead(self, replica: _Replica, reason: str) -> None:
        if replica.dead_reason is None:
            replica.dead_reason = reason
            log.error("replica %d died: %s; %d of %d left", replica.index, reason, len(self.live()),
                      len(self.replicas))
            self._healthy.labels(self.metrics.model_name, str(replica.index)).set(0)

    async def choose(self, tried: set[int], prefill: bool = True) -> _Replica:
        """The live replica (not in `tried`) with the most free KV blocks, then the fewest requests in flight;
        with --pd-disaggregation among the prefill replicas (prefill) or the decode ones."""
        candidates = [r for r in self.live() if r.index not in tried
                      and (not self.pd_disaggregation or r.is_prefill == prefill)]
        if not candidates:
            raise EngineDeadError("every replica has died" if not self.live() else
                                  "the replicas this request was sent to died")
        loads = await self.loads(candidates)
        scored = [(-loads[r.index]["num_free_blocks"], r.in_flight, r.index, r) for r in candidates
                  if r.index in loads]
        if not scored:
            return await self.choose(tried, prefill)
        best = min(scored)[-1]
        for r in self.replicas:
            self._in_flight.labels(self.metrics.model_name, str(r.index)).set(r.in_flight)
        return best

    async def loads(self, replicas: list[_Replica]) -> dict[int, dict]:
        """Replica index -> {"num_free_blocks", "num_running", "num_waiting"} of those that answer (one Ray
        call each, in parallel; the others are marked dead). Free blocks less the prompt blocks of requests sent
        that the replica has not reported yet."""
        answers = await asyncio.gather(*(asyncio.wait_for(r.actor.load.remote(), LOAD_TIMEOUT_S)
                                         for r in replicas), return_exceptions=True)
        loads = {}
        for r, load in zip(replicas, answers, strict=True):
            if isinstance(load, BaseException) or load.get("dead_reason"):
                self.mark_dead(r, load.get("dead_reason") if isinstance(load, dict) else str(_cause(load)))
                continue
            loads[r.index] = {**load, "num_free_blocks": load["num_free_blocks"] - r.unreported_blocks}
        return loads

    # ---- failures and migrations (called by ReplicaStream) -------------------------------------
    def replica_failed(self, stream: ReplicaStream, replica: _Replica, error: BaseException) -> bool:
        """True when the request may go to another replica (its replica died before its first output);
        otherwise raises the error its client gets."""
        err = _cause(error)
        if not isinstance(err, ReplicaDeadError):
            self.metrics.finished("error")
            raise err from None
        self.mark_dead(replica, str(err))
        if stream.num_outputs:
            self.metrics.finished("error")
            raise RequestFailedError(f"replica {replica.index} died while serving this request ({err})") from None
        return True

    def migrated(self, stream: ReplicaStream, downtime: float) -> None:
        self._migrations.inc()
        self._downtime.observe(downtime)
        if stream.resumed is not None and not stream.resumed.done():
            stream.resumed.set_result(downtime)

    async def migrate(self, request_id: str | None = None, to: int | None = None,
                      max_stages: int | None = None) -> dict:
        """Move a running request with its KV to another replica (`to`, else the least loaded; with
        --pd-disaggregation a decode replica), in `max_stages` stages (default --migration-max-stages; 1: one
        stop-and-copy). Without `request_id`: a request of the busiest replica. The client's stream goes on;
        -> {request_id, from, to, downtime_s, stages, num_precopied_tokens, num_stopped_tokens}."""
        if request_id is None:
            busy = [s for s in self.streams.values() if s.replica is not None and s.migration is None]
            if not busy:
                raise MigrationRefused("no running request to migrate")
            request_id = max(busy, key=lambda s: (s.replica.in_flight, s.num_outputs)).request_id
        stream = self.streams.get(request_id)
        if stream is None or stream.replica is None:
            raise MigrationRefused(f"request {request_id!r} is not running")
        if stream.migration is not None:
            raise MigrationRefused(f"request {request_id!r} is already migrating")
        if max_stages is not None and max_stages < 1:
            raise MigrationRefused(f"max_stages must be >= 1, got {max_stages}")
        src = stream.replica
        if to is not None:
            dest = next((r for r in self.live() if r.index == to and r is not src), None)
            if dest is None:
                raise MigrationRefused(f"replica {to} is not a live replica other than the request's ({src.index})")
        else:
            dest = await self.choose({src.index}, prefill=False)
        return await live_migration.migrate(self, stream, src, dest, max_stages or self.migration.migration_max_stages,
                                            self.migration.migration_last_stage_max_blocks)

    # ---- the AsyncEngine surface the API uses ---------------------------------------------------
    def add_request(self, prompt_ids: list[int], params, request_id: str | None = None, priority: int = 0,
                    timeout: float | None = None) -> ReplicaStream:
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self.dead_reason}")
        if not self.is_ready:
            raise EngineNotReadyError("the replicas are still loading")
        rid = f"{request_id or 'req'}-{next(self._ids)}"
        timeout = timeout if timeout is not None else self.request_timeout
        return ReplicaStream(self, rid, (list(prompt_ids), params, priority, timeout))

    def abort(self, request_id: str) -> None:
        replica = self.placed.get(request_id)
        if replica is not None and replica.dead_reason is None:
            replica.actor.abort.remote(request_id)

    async def call(self, fn):
        """fn(engine) on one live replica's engine thread (embeddings)."""
        live = self.live()
        if not live:
            raise EngineDeadError("every replica has died")
        replica = min(live, key=lambda r: r.in_flight)
        try:
            return await replica.actor.call.remote(fn)
        except Exception as e:  # noqa: BLE001
            err = _cause(e)
            if isinstance(err, ReplicaDeadError):
                self.mark_dead(replica, str(err))
            raise err from None
