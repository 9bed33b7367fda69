"""Eviction policies for expert pools: LRU, LFU, LFRU, score (HybriMoE EMA) and Belady (offline).

One policy object holds the state of one pool (see pools.py). The pool calls, in this order:
`on_route(layer, experts, weights)` once per token and layer (router output, before the accesses),
`on_access(key)` on every demand access (hit or miss), `on_insert(key, prefetched)` after a key is
given a slot, `on_evict(key)` when it loses it, and `victim(candidates)` to pick which resident,
evictable key goes. Keys are (layer, expert). Time is the pool's count of accesses and inserts.

Definitions (the tests hand-compute hit counts from these):
- lru:   evict the least recently accessed or inserted key.
- lfu:   evict the key with the fewest demand accesses *ever* (counts survive eviction, so popular
         experts are remembered); ties by LRU.
- lfru:  LRFU (Lee et al.): each access adds 1 to a value that halves every `half_life` time units;
         evict the smallest decayed value; ties by LRU. half_life defaults to the pool capacity.
- score: HybriMoE's score-aware cache: per layer, on each token s_e <- (1-a) s_e + a p_e where p_e is
         the router weight (0 when e is not chosen); evict the lowest score; ties by LRU.
- nextuse: an online estimate of Belady for layer-cyclic access: p_e is an EMA (rate a) of "expert e
         was chosen" per token at its layer; the next use of (l, e) is expected d_l + (1/p_e - 1) * L
         steps ahead, where d_l is how many layer steps until layer l runs again (L = num_layers);
         evict the largest. In a per-layer pool this reduces to evicting the lowest p_e.
- belady: evict the key whose next demand access is farthest in the future (needs that future).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence

Key = Hashable  # (layer, expert) in practice

ONLINE_POLICIES = ("lru", "lfu", "lfru", "score", "nextuse")
ALL_POLICIES = ONLINE_POLICIES + ("belady",)


class EvictionPolicy:
    name = "base"

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.now = 0
        self.last: dict[Key, int] = {}

    def on_route(self, layer: int, experts: Sequence[int], weights: Sequence[float]) -> None:
        pass

    def on_access(self, key: Key) -> None:
        self.now += 1
        self.last[key] = self.now

    def on_insert(self, key: Key, prefetched: bool) -> None:
        self.now += 1
        self.last[key] = self.now

    def on_evict(self, key: Key) -> None:
        pass

    def priority(self, key: Key) -> tuple:
        """Smaller goes first. Subclasses put their measure before the LRU tie-break."""
        return (self.last.get(key, 0),)

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates, key=self.priority)


class LRU(EvictionPolicy):
    name = "lru"


class LFU(EvictionPolicy):
    name = "lfu"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.count: dict[Key, int] = {}

    def on_access(self, key: Key) -> None:
        super().on_access(key)
        self.count[key] = self.count.get(key, 0) + 1

    def priority(self, key: Key) -> tuple:
        return (self.count.get(key, 0), self.last.get(key, 0))


class LFRU(EvictionPolicy):
    name = "lfru"

    def __init__(self, capacity: int, half_life: float | None = None):
        super().__init__(capacity)
        self.half_life = float(half_life or max(capacity, 1))
        self.crf: dict[Key, tuple[float, int]] = {}  # (value at time t, t)

    def _value_log2(self, key: Key) -> float:
        v, t = self.crf.get(key, (0.0, 0))
        if v <= 0:
            return -math.inf
        return math.log2(v) - (self.now - t) / self.half_life

    def on_access(self, key: Key) -> None:
        super().on_access(key)
        v, t = self.crf.get(key, (0.0, self.now))
        self.crf[key] = (v * 2.0 ** (-(self.now - t) / self.half_life) + 1.0, self.now)

    def priority(self, key: Key) -> tuple:
        return (self._value_log2(key), self.last.get(key, 0))


class Score(EvictionPolicy):
    name = "score"

    def __init__(self, capacity: int, alpha: float = 0.3):
        super().__init__(capacity)
        self.alpha = alpha
        self.tick: dict[int, int] = {}  # layer -> tokens routed so far
        self.score: dict[Key, tuple[float, int]] = {}  # (score at layer tick t, t)

    def _decayed(self, key: Key) -> float:
        s, t = self.score.get(key, (0.0, 0))
        return s * (1.0 - self.alpha) ** (self.tick.get(key[0], 0) - t)

    def on_route(self, layer: int, experts: Sequence[int], weights: Sequence[float]) -> None:
        tick = self.tick.get(layer, 0) + 1
        self.tick[layer] = tick
        for e, w in zip(experts, weights):
            s, t = self.score.get((layer, e), (0.0, tick))
            self.score[(layer, e)] = (s * (1.0 - self.alpha) ** (tick - t) + self.alpha * float(w), tick)
            # the (1-a) factor for this tick is applied lazily to everyone else via the tick gap

    def priority(self, key: Key) -> tuple:
        return (self._decayed(key), self.last.get(key, 0))


class NextUse(Score):
    name = "nextuse"

    def __init__(self, capacity: int, num_layers: int, alpha: float = 0.2):
        super().__init__(capacity, alpha)
        self.num_layers = num_layers
        self.layer = 0  # layer of the latest routed step

    def on_route(self, layer: int, experts: Sequence[int], weights: Sequence[float]) -> None:
        self.layer = layer
        super().on_route(layer, experts, [1.0] * len(experts))

    def priority(self, key: Key) -> tuple:
        L = self.num_layers
        p = max(self._decayed(key), 1e-6)
        steps_to_layer = (key[0] - self.layer - 1) % L + 1  # 1..L; L for the layer that just ran
        return (-(steps_to_layer + (1.0 / p - 1.0) * L), self.last.get(key, 0))


class Belady(EvictionPolicy):
    """Optimal offline demand paging: `future` is this pool's full demand-access sequence, in order."""

    name = "belady"

    def __init__(self, capacity: int, future: Sequence[Key]):
        super().__init__(capacity)
        nxt: list[float] = [math.inf] * len(future)
        seen: dict[Key, int] = {}
        for i in range(len(future) - 1, -1, -1):
            nxt[i] = seen.get(future[i], math.inf)
            seen[future[i]] = i
        self.future, self.next_after, self.pos = future, nxt, 0
        self.first = seen  # key -> first access index
        self.next_use: dict[Key, float] = {}

    def on_access(self, key: Key) -> None:
        super().on_access(key)
        if self.pos >= len(self.future) or self.future[self.pos] != key:
            raise RuntimeError(f"Belady replay diverged at access {self.pos}: expected "
                               f"{self.future[self.pos] if self.pos < len(self.future) else 'end'}, got {key}")
        self.next_use[key] = self.next_after[self.pos]
        self.pos += 1

    def on_insert(self, key: Key, prefetched: bool) -> None:
        super().on_insert(key, prefetched)
        if prefetched:  # next use of a prefetched key: first future access at or after pos
            nxt = math.inf
            for i in range(self.pos, len(self.future)):
                if self.future[i] == key:
                    nxt = i
                    break
            self.next_use[key] = nxt

    def priority(self, key: Key) -> tuple:
        return (-self.next_use.get(key, math.inf), self.last.get(key, 0))


def make_policy(name: str, capacity: int, future: Sequence[Key] | None = None, **kw) -> EvictionPolicy:
    if name == "lru":
        return LRU(capacity)
    if name == "lfu":
        return LFU(capacity)
    if name == "lfru":
        return LFRU(capacity, kw.get("half_life"))
    if name == "score":
        return Score(capacity, kw.get("alpha", 0.3))
    if name == "nextuse":
        return NextUse(capacity, kw.get("num_layers", 1), kw.get("alpha", 0.2))
    if name == "belady":
        if future is None:
            raise ValueError("belady needs the future access sequence")
        return Belady(capacity, future)
    from strata.errors import StrataError

    raise StrataError(f"unknown eviction policy {name!r}: expected one of {', '.join(ALL_POLICIES)}")
