"""AsyncEngine: runs LLMEngine.step() in one background thread and hands each request an async output stream.

The event loop never touches the engine: adds and aborts go through a command queue that the engine thread
drains before every step (so an abort frees the request's blocks within one step), and outputs come back
through one asyncio.Queue per request. A step's outputs for all its requests cross to the event loop in one
loop.call_soon_threadsafe (one wake-up of the loop per step, not per request), and the engine thread never
waits for the loop. A failure while sampling one
sequence fails that request only; a failing step fails the requests it ran; repeated failures kill the
loop, after which /health says 503 and every pending request gets an error.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from strata.engine.llm_engine import LLMEngine
from strata.engine.outputs import DeferredOutput, RequestOutput
from strata.engine.sampling_params import SamplingParams
from strata.errors import StrataError
from strata.server.metrics import EngineMetrics
from strata.server.output_handoff import OutputHandoff
from strata.server.request_stream import (
    EngineDeadError,
    EngineNotReadyError,
    OverloadedError,
    RequestFailedError,
    RequestMigratedError,
    RequestStream,
)

log = logging.getLogger("strata.server")

MAX_CONSECUTIVE_STEP_FAILURES = 3
# Between steps that start or end a request the gauges (running, waiting, KV usage) change little: they are
# republished at this interval instead of after every step (on a sub-millisecond step they cost a large share
# of it). Admission's free-slot count moves when a request starts or ends (republished at once), or when a TPOT
# target's limit moves (seen within the interval).
GAUGE_INTERVAL_S = 0.05


@dataclass
class _Tracked:
    stream: RequestStream
    t_add: float
    t_scheduled: float | None = None
    t_first: float | None = None
    t_last: float | None = None
    num_tokens: int = 0
    num_seqs: int = 1  # request_success counts sequences, so an abort or error counts this many
    extra: dict = field(default_factory=dict)


class AsyncEngine:
    def __init__(self, engine_factory: Callable[[], LLMEngine], metrics: EngineMetrics | None = None,
                 max_queued_requests: int | None = None, request_timeout: float | None = None,
                 on_load_failure: Callable[[str], None] | None = None, stream_interval_ms: float = 0.0):
        self._factory = engine_factory
        self._ready = False  # the model loaded and the first gauges published
        self.outputs = OutputHandoff(stream_interval_ms / 1e3)  # the engine thread's outputs to the streams
        self._on_load_failure = on_load_failure
        self.engine: LLMEngine | None = None
        self.metrics = metrics or EngineMetrics()
        self.max_queued_requests = max_queued_requests
        self.request_timeout = request_timeout
        self.dead_reason: str | None = None
        self._cmds: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._waiting_ids: set[str] = set()  # added, not yet scheduled (the bounded queue)
        self._free_slots = 0  # max_num_seqs minus running sequences, as of the last step
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._handoffs: set[str] = set()  # tracked requests that leave after their first token (engine thread)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = 0
        self._load = {"num_free_blocks": 0, "num_running": 0, "num_waiting": 0}
        self._unscheduled: set[str] = set()  # tracked requests not yet in a step (engine thread)
        self._last_publish = 0.0  # time.monotonic() of the last full gauge publish (engine thread)
        self._forwarded = False  # the step in progress has run the model (engine thread)

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = self.outputs.loop = loop
        self._thread = threading.Thread(target=self._run, name="strata-engine", daemon=True)
        self._thread.start()

    @property
    def is_ready(self) -> bool:
        return self._ready and self.dead_reason is None

    @property
    def num_unfinished(self) -> int:
        return len(self._tracked)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._cmds.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the event-loop side -------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    priority: int = 0, timeout: float | None = None, handoff: bool = False) -> RequestStream:
        """`handoff` (a prefill replica): right after its first token the request leaves this engine with its
        KV; its stream then ends with RequestMigratedError carrying the MigratedRequest."""
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self.dead_reason}")
        if self.engine is None:
            raise EngineNotReadyError("the model is still loading")
        with self._lock:
            # the bound is on requests that must wait: those the free sequence slots will take do not count
            num_waiting = len(self._waiting_ids) - self._free_slots
            if self.max_queued_requests is not None and num_waiting >= self.max_queued_requests:
                raise OverloadedError(max(num_waiting, 0), self.max_queued_requests)
            self._ids += 1
            rid = f"{request_id or 'req'}-{self._ids}"
            self._waiting_ids.add(rid)
        timeout = timeout if timeout is not None else self.request_timeout
        stream = RequestStream(self, rid, None if timeout is None else time.monotonic() + timeout)
        self._cmds.put(("add", rid, prompt_ids, params, priority, stream, time.monotonic(), handoff))
        return stream

    def abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id))

    async def migrate_out(self, request_id: str, kv_from: int = 0, num_preemptions: int | None = None):
        """Take a decoding request out of this engine with its KV from token `kv_from` on (the rest was
        pre-copied; strata/engine/migration.py); its stream ends with RequestMigratedError. -> the
        MigratedRequest for resume_request on another engine."""
        return await self.call(lambda eng: self._export(eng, request_id, kv_from, num_preemptions))

    def resume_request(self, migrated, request_id: str, timeout: float | None = None,
                       staged=None) -> RequestStream:
        """A stream for a request migrated from another engine, which goes on decoding here (`staged`: its
        pre-copied KV in this engine's blocks, migration_staging.StagedKV)."""
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self.dead_reason}")
        if self.engine is None:
            raise EngineNotReadyError("the model is still loading")
        with self._lock:
            self._ids += 1
            rid = f"{request_id}-{self._ids}"
        timeout = timeout if timeout is not None else self.request_timeout
        stream = RequestStream(self, rid, None if timeout is None else time.monotonic() + timeout)
        self._cmds.put(("resume", rid, migrated, stream, time.monotonic(), staged))
        return stream

    async def call(self, fn: Callable[[LLMEngine], object]):
        """fn(engine) run in the engine thread between two steps (the model is not shared across threads)."""
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self.dead_reason}")
        if self.engine is None:
            raise EngineNotReadyError("the model is still loading")
        future = self._loop.create_future()
        self._cmds.put(("call", fn, future))
        return await future

    def _settle(self, future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
        def settle():
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(result)
        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is closed (shutdown)
            pass

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._factory()
            self.engine.before_forward = self._before_forward
            self._publish_gauges()
            self.engine.isolate_sampling_failures()
            self.engine.defer_detokenization()  # text and RequestOutputs are built in the event loop (output_handoff)
            self._ready = True  # after the first gauges: a caller that sees it ready sees them
            log.info("engine ready: %s", self.engine.describe())
        except Exception as e:
            if isinstance(e, StrataError):  # a message the user can act on: no traceback
                log.error("model failed to load: %s", e)
            else:
                log.exception("model failed to load")
            self._die(f"model failed to load: {e}")
            if self._on_load_failure is not None:
                self._on_load_failure(str(e))
            return
        try:
            self._loop_forever()
        except Exception as e:  # a bug outside step(): say so on /health instead of hanging
            log.exception("engine loop crashed")
            self._die(f"engine loop crashed: {type(e).__name__}: {e}")
            return
        self._die("server shutting down")

    def _loop_forever(self) -> None:
        failures = 0
        while not self._stop.is_set():
            idle = not self.engine.has_unfinished_requests()
            if idle:
                self.outputs.flush()
            self._drain_commands(block=idle)
            if self._stop.is_set():
                return
            if not self.engine.has_unfinished_requests():
                continue
            t0 = time.monotonic()
            self._forwarded = False
            try:
                outputs = self.engine.step()
                if not self._forwarded:  # no forward to overlap with: the outputs due go now
                    self.outputs.wake_due()
                failures = 0
            except Exception as e:
                failures += 1
                log.exception("engine step failed (%d in a row)", failures)
                victims = set(self.engine.running_request_ids()) or set(self._tracked)
                for rid in victims:
                    self._fail(rid, RequestFailedError(f"generation failed: {type(e).__name__}: {e}"))
                if failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                    raise RuntimeError(f"{failures} consecutive step failures, last: {type(e).__name__}: {e}") \
                        from e
                continue
            self._after_step(outputs, t0)

    def _before_forward(self) -> None:
        self._forwarded = True
        self.outputs.wake_due()

    def _drain_commands(self, block: bool) -> None:
        if not block and self._cmds.empty():  # the usual case between two steps: no exception raised and caught
            return
        try:
            cmd = self._cmds.get(timeout=0.5) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(cmd)
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return

    def _handle(self, cmd) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, ids, params, priority, stream, t_add, handoff = cmd
            if stream.finished:  # aborted before it reached the engine
                self._discard_waiting(rid)
                self.metrics.finished("abort", params.n)
                return
            try:
                self.engine.add_request(ids, params, request_id=rid, priority=priority)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                self._discard_waiting(rid)
                self.outputs.deliver(stream, e)
                return
            self._tracked[rid] = _Tracked(stream, t_add, num_seqs=params.n)
            self._unscheduled.add(rid)
            if handoff:
                self._handoffs.add(rid)
        elif kind == "resume":
            from strata.engine.migration import import_request

            _, rid, migrated, stream, t_add, staged = cmd
            try:
                import_request(self.engine, migrated, rid, staged)
            except Exception as e:  # noqa: BLE001 - the migration fails alone
                self.outputs.deliver(stream, e)
                return
            done = len(migrated.token_ids) - migrated.num_prompt_tokens
            self._tracked[rid] = _Tracked(stream, t_add, t_scheduled=t_add, t_first=t_add, t_last=t_add,
                                          num_tokens=done)
        elif kind == "call":
            _, fn, future = cmd
            try:
                self._settle(future, fn(self.engine))
            except Exception as e:  # noqa: BLE001 - the caller's failure, not the loop's
                self._settle(future, error=e)
        elif kind == "abort":
            rid = cmd[1]
            self._discard_waiting(rid)
            if rid in self._tracked:
                self.engine.abort_request(rid)
                self.metrics.finished("abort", self._tracked.pop(rid).num_seqs)
            self._publish_gauges()

    def _export(self, eng: LLMEngine, rid: str, kv_from: int = 0, num_preemptions: int | None = None):
        from strata.engine.migration import export_request

        migrated = export_request(eng, rid, kv_from, num_preemptions)
        tr = self._tracked.pop(rid, None)
        if tr is not None:
            self.outputs.deliver(tr.stream, RequestMigratedError(f"request {rid} migrated"))
        self._publish_gauges()
        return migrated

    def _discard_waiting(self, rid: str) -> None:
        with self._lock:
            self._waiting_ids.discard(rid)

    def _fail(self, rid: str, err: Exception) -> None:
        self._discard_waiting(rid)
        self.engine.abort_request(rid)
        tr = self._tracked.pop(rid, None)
        if tr is not None:
            self.metrics.finished("error", tr.num_seqs)
            self.outputs.deliver(tr.stream, err)

    def _after_step(self, outputs: list[RequestOutput | DeferredOutput], t0: float) -> None:
        now = time.monotonic()
        changed = False  # a request started or ended: the gauges are republished at once
        for rid, err in self.engine.take_sampling_failures().items():
            self._fail(rid, RequestFailedError(f"generation failed: {type(err).__name__}: {err}"))
            changed = True
        if self._unscheduled:  # requests waiting for their first step: the others skip this scan
            self._unscheduled &= self._tracked.keys()  # aborted or failed meanwhile
            started = self._unscheduled.intersection(self.engine.running_request_ids())
            for rid in started:
                self._mark_scheduled(self._tracked[rid], rid, t0)
            changed = changed or bool(started)
        deliveries = []
        num_generated = 0
        urgent = False  # a first token or a finished request: the loop is woken now, whatever the interval
        for out in outputs:
            tr = self._tracked.get(out.request_id)
            if tr is None:
                continue
            if tr.t_scheduled is None:
                self._mark_scheduled(tr, out.request_id, t0)
                changed = True
            num = out.num_generated_tokens
            new = num - tr.num_tokens
            if new > 0:
                if tr.t_first is None:
                    tr.t_first = now
                    urgent = True
                    self.metrics.ttft.observe(now - tr.t_add)
                    self.metrics.prompt_tokens.inc(len(out.prompt_token_ids))
                else:
                    self.metrics.itl.observe(now - tr.t_last)
                tr.t_last = now
                tr.num_tokens = num
                num_generated += new
            deliveries.append((tr.stream, out))
            if out.finished:
                del self._tracked[out.request_id]
                self.metrics.e2e.observe(now - tr.t_add)
                for reason in out.finish_reasons:
                    self.metrics.finished(reason or "abort")
                changed = urgent = True
        if num_generated:
            self.metrics.generation_tokens.inc(num_generated)
        self.outputs.deliver_all(deliveries, urgent)
        if self._handoffs:  # prefill replicas only: the others skip the scan
            self._handoffs &= self._tracked.keys()  # finished, aborted or failed meanwhile
            for rid in [rid for rid in self._handoffs if self._tracked[rid].t_first is not None]:
                self._hand_off(rid)
        if changed or now - self._last_publish >= GAUGE_INTERVAL_S:
            self._publish_gauges()

    def _mark_scheduled(self, tr: _Tracked, rid: str, t0: float) -> None:
        tr.t_scheduled = t0
        self._unscheduled.discard(rid)
        self._discard_waiting(rid)
        self.metrics.queue_time.observe(t0 - tr.t_add)

    def _hand_off(self, rid: str) -> None:
        """A prefill replica's request after its first token: out with its KV (it goes on decoding here when it
        cannot move, e.g. structured outputs)."""
        from strata.engine.migration import MigrationError, export_request

        tr = self._tracked[rid]
        self._handoffs.discard(rid)
        try:
            migrated = export_request(self.engine, rid)
        except MigrationError as e:
            log.info("request %s stays on the prefill replica: %s", rid, e)
            return
        del self._tracked[rid]
        self.outputs.deliver(tr.stream, RequestMigratedError(f"request {rid} handed off", migrated))

    def _publish_gauges(self) -> None:
        eng = self.engine
        self._last_publish = time.monotonic()
        with self._lock:
            # preempted requests wait again in the scheduler (no longer in _waiting_ids): count them too
            waiting = len(self._waiting_ids | set(eng.waiting_request_ids()))
            self._free_slots = eng.num_free_seq_slots()
        running = len(eng.running_request_ids())
        self._load = {"num_free_blocks": eng.num_free_kv_blocks(), "num_running": running, "num_waiting": waiting}
        self.metrics.publish(eng.get_stats(), num_running=running, num_waiting=waiting)

    def health(self) -> dict:
        """/health's body while the engine serves (the replica router adds its replicas' states)."""
        return {"status": "ok"}

    def load(self) -> dict:
        """The load a router weighs, as of the last step: free KV blocks, running and waiting requests."""
        return dict(self._load)

    def _die(self, reason: str) -> None:
        self.dead_reason = reason
        err = EngineDeadError(f"the engine loop has stopped: {reason}")
        for tr in self._tracked.values():
            self.outputs.deliver(tr.stream, err)
        self._tracked.clear()
        # requests still in the command queue never reached the engine
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                self.outputs.deliver(cmd[5], err)
            elif cmd[0] == "resume":
                self.outputs.deliver(cmd[3], err)
            elif cmd[0] == "call":
                self._settle(cmd[2], error=err)
        with self._lock:
            self._waiting_ids.clear()
