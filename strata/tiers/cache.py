"""ExpertCache: a preallocated pool of expert slots filled from the ExpertStore, with background reads.

Storage is one page-aligned uint8 buffer of num_slots x slot_bytes (or, for a store whose experts differ
in size, `class_slots` slots of each size class), allocated once (no allocation per token); the slot
table, eviction policy and counters are pools.ExpertPools. `bind` turns a slot's tensor views into what
`hold` yields (a quantized expert module, quant_experts.py). All table decisions are made under one
lock by the calling thread; I/O threads only fill slots. A slot that is being read, or whose tensors a
caller is using, is "busy" and never evicted, so a prefetch can waste bandwidth but never change what a
running expert reads. A demand access to an expert whose prefetch is still
in flight waits for that read instead of reading again.

The tier is device-agnostic in its bookkeeping; the buffer is host memory today (a GPU tier would
add a device pool fed from this one).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager

import torch

from strata.errors import StrataError
from strata.tiers.pools import ExpertPools, TierStats
from strata.tiers.store import ExpertStore, alloc_aligned

Key = tuple[int, int]
DEMAND, PREFETCH = 0, 1


class IOQueue:
    """Worker threads serving reads in priority order (demand before prefetch), FIFO within a priority."""

    def __init__(self, workers: int = 1):
        self._q: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._threads = [threading.Thread(target=self._run, daemon=True, name=f"strata-io-{i}")
                         for i in range(max(1, workers))]
        for t in self._threads:
            t.start()

    def submit(self, priority: int, fn, *args) -> Future:
        fut: Future = Future()
        self._q.put((priority, next(self._seq), fn, args, fut))
        return fut

    def _run(self) -> None:
        while True:
            _, _, fn, args, fut = self._q.get()
            if fn is None:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except Exception as e:  # noqa: BLE001 - delivered to whoever waits on the read
                fut.set_exception(e)

    def close(self) -> None:
        for _ in self._threads:
            self._q.put((99, next(self._seq), None, (), None))
        for t in self._threads:
            t.join()


class ExpertCache:
    def __init__(self, store: ExpertStore, num_slots: int, policy: str = "nextuse", layout: str = "global",
                 io_workers: int = 1, populate: bool = False, pins: Iterable[Key] = (),
                 bind: Callable[[Key, dict[str, torch.Tensor], object], object] | None = None,
                 class_slots: list[int] | None = None, **policy_kw):
        self.store = store
        # (key, slot views, what the slot's previous expert was bound to, or None) -> what hold() yields;
        # kept with the slot until it is read again
        self.bind = bind
        self.slot_bytes = store.slot_bytes
        self.num_slots = num_slots
        # class_slots: slots per size class of the store (store.class_bytes), one pool each; else one size
        sizes, counts = (store.class_bytes, class_slots) if class_slots else ([store.slot_bytes], [num_slots])
        self._slots: list[tuple[int, int]] = []  # slot -> (offset, bytes) in storage
        for nbytes, n in zip(sizes, counts):
            start = self._slots[-1][0] + self._slots[-1][1] if self._slots else 0
            self._slots += [(start + i * nbytes, nbytes) for i in range(n)]
        total = self._slots[-1][0] + self._slots[-1][1] if self._slots else 0
        self._mm, self.storage = alloc_aligned(total, populate)  # [sum of slot bytes]
        self._buf = memoryview(self._mm)
        self.pools = ExpertPools(store.num_layers, num_slots, policy, layout, nbytes=store.nbytes,
                                 class_slots=class_slots, class_of=store.size_class if class_slots else None,
                                 **policy_kw)
        self._lock = threading.RLock()  # reentrant: a read may finish before its callback is added
        self._loading: dict[Key, Future] = {}
        self._requested: set[Key] = set()
        self._views: dict[int, tuple[Key, object]] = {}
        self._unbound: dict[int, object] = {}  # slot -> its previous bound object, handed to bind for reuse
        self._io = IOQueue(io_workers)
        with self._lock:
            pinned = self.pools.pin(pins)
        for key, slot in pinned:  # pinned experts are read once, now
            self.store.read_into(key, self._slot_buf(slot))

    @property
    def stats(self) -> TierStats:
        return self.pools.stats

    def _slot_buf(self, slot: int) -> memoryview:
        off, n = self._slots[slot]
        return self._buf[off : off + n]

    # ---- reads --------------------------------------------------------------------------------------
    def _start_read(self, key: Key, slot: int, priority: int) -> None:
        """Caller holds the lock. The key stays busy until its read finishes."""
        self.pools.mark_busy(key, +1)
        old = self._views.pop(slot, None)
        if old is not None:
            self._unbound[slot] = old[1]
        fut = self._io.submit(priority, self._timed_read, key, self._slot_buf(slot))
        self._loading[key] = fut
        fut.add_done_callback(lambda f, key=key: self._read_done(key, f))

    def _timed_read(self, key: Key, buf: memoryview) -> int:
        """On an I/O worker: one read, its duration added to the stats."""
        t0 = time.perf_counter()
        n = self.store.read_into(key, buf)
        dt = time.perf_counter() - t0
        with self._lock:
            self.stats.disk_read_s += dt
        return n

    def _read_done(self, key: Key, fut: Future) -> None:
        with self._lock:
            self.pools.mark_busy(key, -1)
            if self._loading.get(key) is fut:
                del self._loading[key]
            if fut.exception() is not None:
                self.pools.discard(key)  # a failed read must not look resident

    def _wait(self, fut: Future) -> None:
        if fut.done():
            fut.result()
            return
        t0 = time.perf_counter()
        try:
            fut.result()
        finally:
            self.stats.io_stall_s += time.perf_counter() - t0

    # ---- the interface the expert provider uses ---------------------------------------------------
    def route(self, layer: int, experts: list[list[int]], weights: list[list[float]]) -> None:
        """Router output at `layer`, one row per token (feeds score-based policies)."""
        with self._lock:
            for ex, ws in zip(experts, weights):
                self.pools.route(layer, ex, ws)

    def is_resident(self, layer: int, expert: int) -> bool:
        """Resident or being read."""
        return self.pools.slot((layer, expert)) is not None

    def prefetch(self, layer: int, experts: Iterable[int]) -> int:
        """Starts background reads of predicted experts. Returns how many reads were started."""
        started = 0
        with self._lock:
            self.pools.begin_prefetch_round()
            for e in experts:
                key = (layer, int(e))
                if key in self._loading:
                    continue
                taken = self.pools.prefetch(key)
                if taken is not None:
                    self._start_read(key, taken[0], PREFETCH)
                    started += 1
        return started

    def _admit(self, key: Key) -> int | None:
        """Demand access under the lock: returns the slot (read started if it was a miss) or None.
        The key is left busy (held) for the caller."""
        hit, slot, _ = self.pools.access(key)
        if slot is None:
            return None
        if not hit:
            self._start_read(key, slot, DEMAND)
        self.pools.mark_busy(key, +1)
        return slot

    def request(self, layer: int, experts: Iterable[int], skip_misses: bool = False) -> list[int]:
        """The demand accesses of one step: reads of missing experts start now (demand priority), so
        later experts load while earlier ones compute. Requested experts stay protected from eviction
        until hold() or release().

        skip_misses (the miss fallbacks of provider.py): an expert neither resident nor being read is
        not held; its read starts behind the demand reads, so a later token finds it, and it is returned
        in the list of skipped experts (the caller computes without it or from another copy)."""
        skipped = []
        with self._lock:
            for e in dict.fromkeys(int(e) for e in experts):
                key = (layer, e)
                if skip_misses and key not in self._requested and self.pools.slot(key) is None:
                    _, slot, _ = self.pools.access(key)  # counts the access and the miss
                    if slot is not None:  # None: every slot is busy; a later token asks again
                        self._start_read(key, slot, PREFETCH)
                    skipped.append(e)
                elif key not in self._requested and self._admit(key) is not None:
                    self._requested.add(key)
        return skipped

    def release(self, layer: int, experts: Iterable[int]) -> None:
        """Drops the protection of requested experts that were never held."""
        with self._lock:
            for e in experts:
                key = (layer, int(e))
                if key in self._requested:
                    self._requested.discard(key)
                    self.pools.mark_busy(key, -1)

    @contextmanager
    def hold(self, layer: int, expert: int) -> Iterator[object]:
        """The expert's tensors (views of its slot; or what `bind` made of them), resident and unevictable
        inside the block."""
        key = (layer, int(expert))
        with self._lock:
            if key in self._requested:  # its access was counted by request(); the hold takes over
                self._requested.discard(key)
                slot = self.pools.slot(key)
            else:
                slot = self._admit(key)
        if slot is None:
            slot = self._admit_waiting(key)
        try:
            fut = self._loading.get(key)
            if fut is not None:
                self._wait(fut)
            yield self._views_of(key, slot)
        finally:
            with self._lock:
                self.pools.mark_busy(key, -1)

    @contextmanager
    def hold_all(self, layer: int, experts: list[int]) -> Iterator[dict[int, object] | None]:
        """Every expert of a step at once, {expert: what hold() yields}, for a call that needs all their weights
        together (the native grouped-expert kernel). Only experts whose request() found them a slot qualify: if
        any did not (the pool is smaller than the step's experts), yields None and holds nothing; the caller
        then runs them one hold() at a time."""
        keys = [(layer, int(e)) for e in experts]
        with self._lock:
            if not all(k in self._requested for k in keys):
                keys = None
            else:
                for k in keys:  # the hold takes over the protection request() gave
                    self._requested.discard(k)
        if keys is None:
            yield None
            return
        try:
            for k in keys:
                fut = self._loading.get(k)
                if fut is not None:
                    self._wait(fut)
            with self._lock:
                slots = [self.pools.slot(k) for k in keys]
                views = {k[1]: self._views_of(k, s) for k, s in zip(keys, slots)}
            yield views
        finally:
            with self._lock:
                for k in keys:
                    self.pools.mark_busy(k, -1)

    def _admit_waiting(self, key: Key) -> int:
        """Every slot of the key's pool is busy: wait for in-flight reads, then drop the protection of
        requested-but-unheld experts, before giving up."""
        while True:
            with self._lock:
                slot = self._admit(key)
                pending = next(iter(self._loading.values()), None)
                if slot is None and pending is None and self._requested:
                    for k in list(self._requested):
                        self._requested.discard(k)
                        self.pools.mark_busy(k, -1)
                    continue
            if slot is not None:
                return slot
            if pending is None:
                raise StrataError(f"expert cache pool for layer {key[0]} has no free slot for expert {key[1]}: "
                                  f"all of its slots are pinned or in use (cache has {self.num_slots} slots)")
            try:
                self._wait(pending)
            except StrataError:
                pass  # that read's own waiter reports it

    def _views_of(self, key: Key, slot: int) -> object:
        cached = self._views.get(slot)
        if cached is None or cached[0] != key:
            off, n = self._slots[slot]
            base = self.storage[off : off + n]  # [slot bytes]
            views = self.store.views(key, base)
            cached = (key, views if self.bind is None else self.bind(key, views, self._unbound.pop(slot, None)))
            self._views[slot] = cached
        return cached[1]

    def close(self) -> None:
        self._io.close()
        self._views.clear()
        self._unbound.clear()
        self._buf.release()
        self.storage = None
        try:
            self._mm.close()
        except BufferError:  # a caller still holds a view; the mapping goes when that view does
            pass
