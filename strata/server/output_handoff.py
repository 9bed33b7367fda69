"""OutputHandoff: carries the engine thread's outputs to the event loop's request streams.

A wake-up of the event loop hands the GIL to it: on a fast step that costs as much as the step, so steady
outputs go out at most once per stream interval (they pile up here, and the streams merge them into one chunk);
urgent ones (a first token, a finished request, an error) wake the loop at once. Steady outputs whose interval has
passed wait for `wake_due()`, which the engine thread calls right before the next forward's native code: the loop's
Python (SSE chunks, sends) then runs while that code holds no GIL, instead of stalling the engine thread's own
Python between two forwards. Only one wake is in flight: later steps add to the pending list the loop has yet to
take. The loop resolves the engine's DeferredOutputs as it takes them (detokenizing, building the RequestOutputs:
strata/engine/outputs.py), in the order the steps produced them.
"""

from __future__ import annotations

import asyncio
import threading
import time

from strata.engine.outputs import DeferredOutput, resolve_run
from strata.server.request_stream import RequestFailedError, RequestStream


class OutputHandoff:
    def __init__(self, stream_interval_s: float = 0.0):
        self.stream_interval = stream_interval_s
        self.loop: asyncio.AbstractEventLoop | None = None  # set by AsyncEngine.start
        self._lock = threading.Lock()
        self._pending: list[tuple[RequestStream, object]] = []  # outputs the event loop has yet to take
        self._wake_pending = False  # a _take_pending is scheduled on the loop
        self._wake_due = False  # the interval has passed with outputs pending: wake_due() wakes the loop
        self._last_wake = 0.0  # time.monotonic() when the loop was last woken for outputs

    def deliver(self, stream: RequestStream, item) -> None:
        """(engine thread) One item (an error, a migration's end) at once, behind the outputs still pending."""
        self.deliver_all([(stream, item)], urgent=True)

    def deliver_all(self, items: list[tuple[RequestStream, object]], urgent: bool = False) -> None:
        """(engine thread) Outputs to the event loop: at once when `urgent`, at the next wake_due() once the
        interval has passed."""
        with self._lock:
            self._pending.extend(items)
            if self._wake_pending or not self._pending:
                return
            if not urgent:
                # a later step's wake_due(), or the engine going idle (flush), wakes the loop
                self._wake_due = time.monotonic() - self._last_wake >= self.stream_interval
                return
            self._claim_wake()
        self._wake()

    def wake_due(self) -> None:
        """(engine thread, right before a forward) Wakes the loop when outputs have waited for an interval."""
        if not self._wake_due:
            return
        with self._lock:
            self._wake_due = False
            if not self._pending or self._wake_pending:
                return
            self._claim_wake()
        self._wake()

    def flush(self) -> None:
        """(engine thread) Wakes the loop for the outputs still pending (the engine is about to wait)."""
        if self._pending:
            self.deliver_all([], urgent=True)

    def _claim_wake(self) -> None:
        """(self._lock held) Marks the one wake in flight."""
        self._wake_pending, self._wake_due = True, False
        self._last_wake = time.monotonic()

    def _wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._take_pending)
        except RuntimeError:  # the event loop is closed (shutdown)
            pass

    def _take_pending(self) -> None:
        """(event loop) Hands the pending outputs to their streams, in the order the steps produced them. A
        stream's consecutive deferred outputs go as one (resolve_run): its consumer would merge them anyway
        (RequestStream takes the outputs waiting together as one), and one is built instead of one per step."""
        with self._lock:
            items, self._pending, self._wake_pending = self._pending, [], False
        by_stream: dict[RequestStream, list] = {}
        for stream, item in items:
            by_stream.setdefault(stream, []).append(item)
        for stream, its in by_stream.items():
            run: list[DeferredOutput] = []
            for item in its:
                if type(item) is DeferredOutput:
                    run.append(item)
                    continue
                if run:
                    self._put_run(stream, run)
                    run = []
                stream.queue.put_nowait(item)
            if run:
                self._put_run(stream, run)

    @staticmethod
    def _put_run(stream: RequestStream, run: list[DeferredOutput]) -> None:
        try:
            item = resolve_run(run)
        except Exception as e:  # noqa: BLE001 - fails its request alone, as a failing step would
            stream.owner.abort(stream.request_id)  # its later outputs cannot be resolved either
            item = RequestFailedError(f"generation failed: {type(e).__name__}: {e}")
        stream.queue.put_nowait(item)
