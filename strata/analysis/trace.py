"""Expert-cache hit rates: replay a routing trace through per-layer caches, or a uniform-routing baseline.

Trace format: JSON lines with `layer` and `experts` (list of expert ids), optional `gating_probs`, in
execution order (what `--record-routing` writes). Policies: lru, lfu, score (evict the lowest
decayed sum of gate probabilities).
"""

from __future__ import annotations

import json
from collections import OrderedDict, defaultdict

from strata.errors import ConfigError

POLICIES = ("lru", "lfu", "score")


def load_trace(path: str, limit: int = 200_000) -> list[tuple[int, list[int], list[float]]]:
    out = []
    try:
        with open(path) as f:
            for i, line in enumerate(f):
                if i >= limit:
                    break
                if not line.strip():
                    continue
                d = json.loads(line)
                experts = d.get("experts", d.get("expert"))
                experts = experts if isinstance(experts, list) else [experts]
                probs = d.get("gating_probs") or [1.0] * len(experts)
                out.append((int(d["layer"]), [int(e) for e in experts], [float(p) for p in probs]))
    except FileNotFoundError:
        raise ConfigError(f"{path}: routing trace not found") from None
    except (KeyError, ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: expected JSON lines with 'layer' and 'experts' ({e})") from None
    return out


def hit_rate(trace: list[tuple[int, list[int], list[float]]], capacity: int, policy: str = "lru",
             decay: float = 0.9) -> float:
    """Fraction of expert uses served from a per-layer cache of `capacity` experts (misses load the expert)."""
    if policy not in POLICIES:
        raise ConfigError(f"cache policy {policy!r}: expected one of {', '.join(POLICIES)}")
    if capacity <= 0:
        return 0.0
    caches: dict[int, OrderedDict] = defaultdict(OrderedDict)
    score: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    hits = uses = 0
    for layer, experts, probs in trace:
        cache, sc = caches[layer], score[layer]
        if policy == "score":
            for e in list(sc):
                sc[e] *= decay
        for e, p in zip(experts, probs):
            uses += 1
            sc[e] += p if policy == "score" else 1.0
            if e in cache:
                hits += 1
                cache.move_to_end(e)
                continue
            if len(cache) >= capacity:
                if policy == "lru":
                    cache.popitem(last=False)
                else:
                    victim = min((x for x in cache if x not in experts), key=lambda x: sc[x], default=None)
                    victim = next(iter(cache)) if victim is None else victim
                    del cache[victim]
            cache[e] = True
    return hits / uses if uses else 0.0


def uniform_hit_rate(cache_frac: float) -> float:
    """Independent uniform routing: a needed expert is resident with probability cache_frac."""
    return max(0.0, min(1.0, cache_frac))
