"""Expert parallel (--enable-expert-parallel): each MoE layer's routed experts partitioned across the ranks.

The ranks keep the tensor-parallel attention (heads split, one all-reduce per attention block), so after it
every rank holds every token's hidden row. The router is replicated: each rank routes all tokens, runs only
the experts it holds on the rows routed to them (the dispatch is a local index_select, no collective), and
the MoE block's output is a partial sum that the block's one all-reduce combines (the same all-reduce tensor
parallel uses). An all-to-all dispatch would send each row only to the ranks of its k experts; it pays off
when the hidden rows are not already on every rank (data-parallel attention, many nodes). Here they are, so
the all-reduce moves the same [T, H] block per rank as tensor parallel and the sum is exact.

Placement is a [num_layers, num_experts] table of ranks, chosen on rank 0 and broadcast before loading:
- linear (default): contiguous blocks of num_experts / N experts per rank;
- affinity (--expert-placement-trace FILE, a --record-routing trace): per layer, experts in decreasing load
  are put on the rank (with room left) whose experts they were most often co-activated with in the same
  token (intra-layer) plus whose rank the token's expert in the previous layer sat on (inter-layer), so a
  token's experts span fewer ranks; the report gives that span and the load imbalance against linear.
Each rank holds num_experts / N experts per layer (equal memory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from strata.config import ModelConfig
from strata.errors import ConfigError, UnsupportedError

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.[a-z_]+\.experts\.(\d+)\.")


def expert_of(name: str) -> tuple[int, int] | None:
    """(layer, expert) of a routed expert's checkpoint tensor, None for any other tensor."""
    m = _EXPERT.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_supported(cfg: ModelConfig, world: int, source: str) -> None:
    if not cfg.is_moe:
        raise UnsupportedError(f"{source}: --enable-expert-parallel needs a MoE model (config.json has no experts)")
    if cfg.num_experts % world:
        raise ConfigError(f"{source}: field 'num_experts' = {cfg.num_experts} is not divisible by "
                          f"--tensor-parallel-size {world} (each rank holds the same number of experts)")


def linear_placement(num_layers: int, num_experts: int, world: int) -> torch.Tensor:
    """[L, E] rank of each expert: contiguous blocks of E / world."""
    return (torch.arange(num_experts) // (num_experts // world)).repeat(num_layers, 1)  # [L, E]


def _tokens(trace) -> list[dict[int, list[int]]]:
    """Each (request, token)'s experts by layer, from a routing trace's records."""
    by_token: dict[tuple[str, int], dict[int, list[int]]] = {}
    for r in trace.records:
        by_token.setdefault((r.request, r.token), {})[r.layer] = list(r.experts)
    return list(by_token.values())


def affinity_placement(trace, num_layers: int, num_experts: int, world: int) -> torch.Tensor:
    """[L, E] rank of each expert, co-activated experts together (see the module docstring)."""
    if trace.num_experts > num_experts or trace.num_layers > num_layers:
        raise ConfigError(f"{trace.source}: routing trace has {trace.num_layers} layers x {trace.num_experts} "
                          f"experts, the model {num_layers} x {num_experts}")
    tokens = _tokens(trace)
    per_rank = num_experts // world
    placement = linear_placement(num_layers, num_experts, world)
    for layer in range(num_layers):
        co = torch.zeros(num_experts, num_experts)  # [E, E] tokens that chose both
        prev = torch.zeros(num_experts, world)  # [E, world] tokens whose previous-layer expert sat on that rank
        load = torch.zeros(num_experts)  # [E]
        for tok in tokens:
            ex = tok.get(layer)
            if not ex:
                continue
            load[ex] += 1
            for a in ex:
                co[a, ex] += 1
                co[a, a] -= 1
            before = tok.get(layer - 1)
            if before:
                for a in ex:
                    for b in before:
                        prev[a, placement[layer - 1, b]] += 1
        if not load.any():
            continue  # no record for this layer: linear
        members: list[list[int]] = [[] for _ in range(world)]
        rank_load = [0.0] * world
        for e in sorted(range(num_experts), key=lambda e: (-load[e].item(), e)):
            open_ranks = [r for r in range(world) if len(members[r]) < per_rank]
            r = max(open_ranks, key=lambda r: (co[e, members[r]].sum().item() + prev[e, r].item(), -rank_load[r], -r))
            members[r].append(e)
            rank_load[r] += load[e].item()
        for r, es in enumerate(members):
            placement[layer, es] = r
    return placement


@dataclass
class PlacementReport:
    """How a placement serves a trace: experts' ranks per token and layer, and the load of the busiest rank."""

    ranks_per_token: float  # mean distinct ranks over a token's k experts at one layer
    imbalance: float  # mean over layers of (busiest rank's expert calls / mean rank's)

    def describe(self) -> str:
        return f"{self.ranks_per_token:.2f} ranks per token and layer, load imbalance {self.imbalance:.2f}"


def placement_report(trace, placement: torch.Tensor, world: int) -> PlacementReport:
    spans, ratios = [], []
    for layer in range(placement.shape[0]):
        calls = torch.zeros(world)
        n = 0
        for r in trace.records:
            if r.layer != layer or not r.experts:
                continue
            ranks = placement[layer, r.experts]  # [k]
            calls += torch.bincount(ranks, minlength=world)
            spans.append(len(set(ranks.tolist())))
            n += 1
        if n:
            ratios.append((calls.max() / calls.mean()).item())
    if not spans:
        raise ConfigError(f"{trace.source}: routing trace has no expert choices")
    return PlacementReport(sum(spans) / len(spans), sum(ratios) / len(ratios))


def choose_placement(cfg: ModelConfig, world: int, trace_path: str | None) -> tuple[torch.Tensor, str]:
    """Rank 0: the [L, E] placement and one line describing it (with the report when a trace is given)."""
    L, E = cfg.num_hidden_layers, cfg.num_experts
    if trace_path is None:
        return linear_placement(L, E, world), f"expert parallel: linear placement, {E // world} experts per rank"
    from strata.tiers.trace import read_trace

    trace = read_trace(trace_path, num_layers=L, num_experts=E)
    placement = affinity_placement(trace, L, E, world)
    got = placement_report(trace, placement, world)
    base = placement_report(trace, linear_placement(L, E, world), world)
    return placement, (f"expert parallel: affinity placement from {trace_path}: {got.describe()} "
                       f"(linear: {base.describe()})")


def local_experts(placement: torch.Tensor, rank: int) -> list[frozenset[int]]:
    """Per layer, the experts rank `rank` holds."""
    return [frozenset((row == rank).nonzero().flatten().tolist()) for row in placement]


def apply(model, placement: torch.Tensor, rank: int) -> None:
    """Make each MoE block run only this rank's experts (the others stay on the meta device)."""
    mine = local_experts(placement, rank)
    for block in model.moe_blocks():
        block.local_experts = mine[block.layer_idx]
