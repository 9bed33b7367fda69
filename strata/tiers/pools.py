"""Slot bookkeeping for expert pools, shared by the cache simulator and the real ExpertCache.

`ExpertPools` maps (layer, expert) keys to slot numbers 0..num_slots-1, in one global pool, one pool
per layer, or one pool per size class (`class_slots`: experts of different sizes, e.g. the int8 and
int4 experts of a `--mixed` plan, each in slots of their own size), each driven by its own eviction
policy. It holds no tensors and does no I/O: callers (simulate.py, cache.py) do the reads and keep the
storage. It also owns the counters, so simulated
and real hit rates are computed by the same code.

Prefetch rules: a prefetch never evicts a pinned or busy key, nor another prefetched key that has not
been used yet (prefetches must not thrash each other); demand accesses may evict any unpinned, non-busy
key. A prefetched key stays protected from demand eviction until the next prefetch round, so the
key predicted for layer l+1 survives the misses of layer l+1 that come before its own access.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass

from strata.errors import StrataError
from strata.tiers.policies import EvictionPolicy, make_policy

Key = Hashable


@dataclass
class TierStats:
    accesses: int = 0
    hits: int = 0  # accesses that found the expert resident or already being read (prefetch included)
    misses: int = 0  # accesses that had to start a demand read
    prefetch_issued: int = 0
    prefetch_hits: int = 0  # misses hidden: the first demand access to a prefetched expert
    prefetch_wasted: int = 0  # prefetched experts evicted without a demand access
    demand_bytes: int = 0
    prefetch_bytes: int = 0
    prefetch_waste_bytes: int = 0
    io_stall_s: float = 0.0  # caller-measured time spent waiting for reads
    disk_read_s: float = 0.0  # time the I/O workers spent inside reads (summed over workers)
    fallback_renormalized: int = 0  # expert calls skipped on a miss (the block renormalized the others)
    fallback_lowbit: int = 0  # expert calls served from the resident low-bit copy on a miss

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def disk_bytes_read(self) -> int:
        return self.demand_bytes + self.prefetch_bytes

    @property
    def disk_read_gb_s(self) -> float | None:
        """Bytes read over the time spent inside reads: per worker; with one I/O worker (the runtime's), the disk
        rate as the engine saw it."""
        return self.disk_bytes_read / self.disk_read_s / 1e9 if self.disk_read_s > 0 else None

    @property
    def prefetch_coverage(self) -> float:
        """Fraction of would-be misses that prefetch turned into hits."""
        would_miss = self.misses + self.prefetch_hits
        return self.prefetch_hits / would_miss if would_miss else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(hit_rate=self.hit_rate, disk_bytes_read=self.disk_bytes_read, disk_read_gb_s=self.disk_read_gb_s,
                 prefetch_coverage=self.prefetch_coverage)
        return d


class _Pool:
    def __init__(self, slots: list[int], policy: EvictionPolicy):
        self.free = list(reversed(slots))  # pop() hands out the lowest slot first
        self.capacity = len(slots)
        self.policy = policy
        self.resident: dict[Key, int] = {}


class ExpertPools:
    """Key -> slot table with per-pool eviction policies, pinning, busy marks and counters."""

    def __init__(self, num_layers: int, num_slots: int, policy: str = "lru", layout: str = "global",
                 future: Sequence[Key] | None = None, nbytes: Callable[[Key], int] | None = None,
                 class_slots: Sequence[int] | None = None, class_of: Callable[[Key], int] | None = None,
                 **policy_kw):
        """class_slots: slots of each size class (they add up to num_slots) and class_of(key) its class;
        None: `layout` decides."""
        if layout not in ("global", "per-layer"):
            raise StrataError(f"expert pool layout must be 'global' or 'per-layer', got {layout!r}")
        n_pools = 1 if layout == "global" else num_layers
        if class_slots is not None:
            if layout != "global" or class_of is None or sum(class_slots) != num_slots or min(class_slots) < 1:
                raise StrataError(f"expert size classes need the global layout, a class of each key and at least "
                                  f"one slot each adding up to {num_slots}, got {list(class_slots)}")
            n_pools = len(class_slots)
        self.class_of = class_of if class_slots is not None else None
        if num_slots < n_pools:
            raise StrataError(f"expert cache has {num_slots} slots but a {layout} layout over {num_layers} "
                              f"layers needs at least {n_pools}")
        self.layout, self.num_layers, self.num_slots = layout, num_layers, num_slots
        self.policy_name = policy
        self.nbytes = nbytes or (lambda key: 1)
        self.stats = TierStats()
        self.pools: list[_Pool] = []
        start = 0
        for i in range(n_pools):
            size = num_slots // n_pools + (1 if i < num_slots % n_pools else 0)
            if class_slots is not None:
                size = class_slots[i]
            fut = None
            if future is not None:
                fut = list(future) if n_pools == 1 else [k for k in future if self._pool_index(k) == i]
            self.pools.append(_Pool(list(range(start, start + size)),
                                    make_policy(policy, size, future=fut, num_layers=num_layers, **policy_kw)))
            start += size
        self.pinned: set[Key] = set()
        self.busy: dict[Key, int] = {}
        self.unused_prefetch: set[Key] = set()
        self.fresh_prefetch: set[Key] = set()

    def _pool_index(self, key: Key) -> int:
        if self.class_of is not None:
            return self.class_of(key)
        return 0 if self.layout == "global" else key[0]

    def pool(self, key: Key) -> _Pool:
        return self.pools[self._pool_index(key)]

    def slot(self, key: Key) -> int | None:
        return self.pool(key).resident.get(key)

    def resident_keys(self) -> list[Key]:
        return [k for p in self.pools for k in p.resident]

    # ---- policy notifications --------------------------------------------------------------------
    def route(self, layer: int, experts: Sequence[int], weights: Sequence[float]) -> None:
        """Router output for one token at `layer` (feeds score-based policies)."""
        pools = [self.pools[layer]] if self.layout == "per-layer" else self.pools
        for p in pools:
            p.policy.on_route(layer, experts, weights)

    def mark_busy(self, key: Key, delta: int) -> None:
        n = self.busy.get(key, 0) + delta
        if n > 0:
            self.busy[key] = n
        else:
            self.busy.pop(key, None)

    # ---- slot admission --------------------------------------------------------------------------
    def _take_slot(self, key: Key, prefetch: bool) -> tuple[int, Key | None] | None:
        pool = self.pool(key)
        if pool.free:
            return pool.free.pop(), None
        blocked = self.pinned.union(self.busy)
        cands = [k for k in pool.resident if k not in blocked and k not in self.fresh_prefetch]
        if prefetch:
            cands = [k for k in cands if k not in self.unused_prefetch]
        elif not cands:
            cands = [k for k in pool.resident if k not in blocked]
        if not cands:
            return None
        victim = pool.policy.victim(cands)
        slot = pool.resident.pop(victim)
        pool.policy.on_evict(victim)
        if victim in self.unused_prefetch:
            self.unused_prefetch.discard(victim)
            self.stats.prefetch_wasted += 1
            self.stats.prefetch_waste_bytes += self.nbytes(victim)
        self.fresh_prefetch.discard(victim)
        return slot, victim

    def access(self, key: Key) -> tuple[bool, int | None, Key | None]:
        """A demand access. Returns (hit, slot, evicted key). slot is None when every slot of the pool is
        pinned or busy (the caller must wait for a busy key to be released and retry)."""
        pool = self.pool(key)
        st = self.stats
        slot = pool.resident.get(key)
        if slot is not None:
            st.accesses += 1
            st.hits += 1
            pool.policy.on_access(key)
            if key in self.unused_prefetch:
                self.unused_prefetch.discard(key)
                st.prefetch_hits += 1
            return True, slot, None
        taken = self._take_slot(key, prefetch=False)
        if taken is None:
            return False, None, None
        st.accesses += 1
        st.misses += 1
        st.demand_bytes += self.nbytes(key)
        pool.policy.on_access(key)
        pool.resident[key] = taken[0]
        pool.policy.on_insert(key, prefetched=False)
        return False, taken[0], taken[1]

    def begin_prefetch_round(self) -> None:
        """Earlier prefetches lose their protection from demand eviction (they had their chance)."""
        self.fresh_prefetch.clear()

    def prefetch(self, key: Key) -> tuple[int, Key | None] | None:
        """Admits a predicted key. Returns (slot, evicted key), or None if resident or no slot may go."""
        pool = self.pool(key)
        if key in pool.resident:
            return None
        taken = self._take_slot(key, prefetch=True)
        if taken is None:
            return None
        pool.resident[key] = taken[0]
        pool.policy.on_insert(key, prefetched=True)
        self.unused_prefetch.add(key)
        self.fresh_prefetch.add(key)
        self.stats.prefetch_issued += 1
        self.stats.prefetch_bytes += self.nbytes(key)
        return taken

    def discard(self, key: Key) -> None:
        """Drops a key without counting an eviction (its read failed)."""
        pool = self.pool(key)
        slot = pool.resident.pop(key, None)
        if slot is not None:
            pool.free.append(slot)
            pool.policy.on_evict(key)
        self.unused_prefetch.discard(key)
        self.fresh_prefetch.discard(key)
        self.pinned.discard(key)

    def pin(self, keys: Iterable[Key]) -> list[tuple[Key, int]]:
        """Makes keys permanently resident. Returns (key, slot) pairs the caller must load."""
        out = []
        for key in keys:
            if key in self.pinned:
                continue
            pool = self.pool(key)
            pinned_here = sum(1 for k in self.pinned if self.pool(k) is pool)
            if pinned_here + 1 >= pool.capacity:
                raise StrataError(f"cannot pin expert {key}: its pool has {pool.capacity} slots and at least "
                                  "one must stay free for other experts")
            slot = pool.resident.get(key)
            if slot is None:
                slot, _ = self._take_slot(key, prefetch=False)
                pool.resident[key] = slot
                pool.policy.on_insert(key, prefetched=False)
                out.append((key, slot))
            self.pinned.add(key)
        return out
