"""Expert-cache simulation: replays a routing trace through policy x prefetcher x budget.

The simulated cache is the real one's bookkeeping (pools.ExpertPools) without tensors or I/O: each
step's distinct experts are demand accesses in order (protected from each other's evictions, as in
the cache), then the prefetcher predicts the next layer's
experts: the k most likely ones that are not resident and whose estimated probability exceeds
min_prob are admitted at once (reads are assumed to finish before the next layer: the
simulation measures hit rates and bytes, not overlap). Budget fraction = fraction of all
(layer, expert) slots. Belady's optimum (demand paging on one global pool) is the reference; it is an
upper bound for every policy without prefetch, whatever its layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from strata.tiers.policies import ONLINE_POLICIES
from strata.tiers.pools import ExpertPools
from strata.tiers.predictors import DEFAULT_MIN_PROB, PREFETCHERS, make_predictor
from strata.tiers.trace import RoutingTrace

MIXTRAL_8X7B_EXPERT_BYTES = 3 * 4096 * 14336 * 2  # bf16 w1/w3/w2 of one Mixtral-8x7B expert


@dataclass
class SimResult:
    policy: str
    prefetch: str
    budget_fraction: float
    num_slots: int
    hit_rate: float
    bytes_read: int
    accesses: int
    hits: int
    prefetch_coverage: float
    prefetch_waste_bytes: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def access_step(pools: ExpertPools, layer: int, experts: list[int]) -> None:
    """One step's demand accesses, with the real cache's rule: experts of the step are protected from
    each other's evictions, unless the pool is too small to hold them all."""
    held: list[tuple[int, int]] = []
    for e in experts:
        key = (layer, e)
        if pools.access(key)[1] is None:
            for k in held:
                pools.mark_busy(k, -1)
            held = []
            pools.access(key)
        pools.mark_busy(key, +1)
        held.append(key)
    for k in held:
        pools.mark_busy(k, -1)


def slots_for(trace: RoutingTrace, budget_fraction: float, layout: str) -> int:
    total = trace.num_layers * trace.num_experts
    floor = trace.num_layers if layout == "per-layer" else 1
    return max(floor, min(total, round(budget_fraction * total)))


def simulate(trace: RoutingTrace, policy: str, budget_fraction: float, prefetch: str = "none",
             layout: str = "global", expert_bytes: int = 1, prefetch_k: int | None = None,
             min_prob: float = DEFAULT_MIN_PROB,
             **policy_kw) -> SimResult:
    num_slots = slots_for(trace, budget_fraction, layout)
    future = None
    if policy == "belady":
        future = [(s.layer, e) for s in trace.steps for e in s.distinct_experts()]
    pools = ExpertPools(trace.num_layers, num_slots, policy, layout, future=future,
                        nbytes=lambda key: expert_bytes, **policy_kw)
    pred = make_predictor(prefetch, trace.num_layers, trace.num_experts)
    k = prefetch_k if prefetch_k is not None else trace.top_k
    request = None
    for step in trace.steps:
        if step.request != request:
            pred.reset()
            request = step.request
        for ex, ws in zip(step.experts, step.weights):
            pools.route(step.layer, ex, ws)
        access_step(pools, step.layer, step.distinct_experts())
        if prefetch != "none":
            pred.observe(step.layer, step.experts, step.weights)
            # a prefill step routes many tokens: predict as many experts as they could use
            want = min(trace.num_experts, k * len(step.tokens))
            nxt = pred.next_layer(step.layer)
            pools.begin_prefetch_round()
            def resident(e: int, nxt: int = nxt) -> bool:
                return pools.slot((nxt, e)) is not None

            for e in pred.predict(step.layer, want, min_prob, skip=resident):
                pools.prefetch((nxt, e))
    st = pools.stats
    return SimResult(policy, prefetch, budget_fraction, num_slots, st.hit_rate, st.disk_bytes_read,
                     st.accesses, st.hits, st.prefetch_coverage, st.prefetch_waste_bytes)


def sweep(trace: RoutingTrace, budgets: list[float], policies: list[str] | None = None,
          prefetchers: list[str] | None = None, layout: str = "global", expert_bytes: int = 1,
          prefetch_k: int | None = None, min_prob: float = DEFAULT_MIN_PROB, progress: bool = False) -> dict:
    """Every online policy x prefetcher x budget, plus Belady per budget. Returns the JSON object."""
    policies = list(policies or ONLINE_POLICIES)
    prefetchers = list(prefetchers or PREFETCHERS)
    combos = [(b, p, f) for b in budgets for p in policies for f in prefetchers]
    it = combos
    if progress:
        from tqdm import tqdm

        it = tqdm(combos, desc="sim-cache", unit="run", leave=False)
    results = [simulate(trace, p, b, f, layout, expert_bytes, prefetch_k, min_prob).to_dict() for b, p, f in it]
    belady = [simulate(trace, "belady", b, "none", "global", expert_bytes).to_dict() for b in budgets]
    for r in results:
        opt = next(x for x in belady if x["budget_fraction"] == r["budget_fraction"])
        r["fraction_of_belady"] = r["hit_rate"] / opt["hit_rate"] if opt["hit_rate"] else 0.0
    return {
        "trace": trace.source,
        "num_layers": trace.num_layers,
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
        "num_tokens": trace.num_tokens,
        "num_steps": len(trace.steps),
        "layout": layout,
        "expert_bytes": expert_bytes,
        "results": results,
        "belady": [{"budget_fraction": b["budget_fraction"], "hit_rate": b["hit_rate"],
                    "bytes_read": b["bytes_read"], "num_slots": b["num_slots"]} for b in belady],
    }


def best_online(report: dict, budget_fraction: float) -> dict:
    rows = [r for r in report["results"] if r["budget_fraction"] == budget_fraction]
    return max(rows, key=lambda r: (r["hit_rate"], -r["bytes_read"]))
