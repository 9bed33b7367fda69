"""TieredExpertProvider: serves SparseMoeBlock experts from the ExpertCache (interface: layers/moe.py).

`acquire(layer, ids)` starts the demand reads of the step's missing experts at once and returns one
callable per expert; a callable holds its slot only while it runs, so a pool smaller than the step's
experts still works (an expert is then read again). The callable runs the block's own expert module
(whose parameters stay on the meta device) on the slot's tensors with torch.func.functional_call, so
offloaded and resident generation execute the same kernels on the same values: identical tokens.
`hold_all` lends a bf16 block every expert of its step at once, for the native grouped-expert call that a
resident block runs too (layers/moe_native.py).

Miss fallbacks (`fallback`, EngineConfig.miss_fallback; the default "none" is exact): on a demand miss
whose read is not already in flight, the read starts in the background (a later token hits) and
- "renormalize": the expert is left out of the returned mapping; the block drops it and rescales the
  token's remaining weights to their top-k sum. A token left with no expert asks again, and that
  request waits for the read: it is computed exactly and not counted as a fallback.
- "lowbit": the expert's resident int4 copy (lowbit.py) runs instead.

`PrefetchHook` is a router hook: after each block routes, it feeds the router output to the cache's
policy and starts background reads for the next MoE block's predicted experts (lookahead gating, or a
trace predictor from predictors.py). Predictions only choose what to read early, never what to run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from strata.layers.moe import SparseMoeBlock
from strata.tiers.cache import ExpertCache
from strata.tiers.predictors import DEFAULT_MIN_PROB, PREFETCHERS, lookahead_experts, make_predictor
from strata.tiers.store import DTYPES


class TieredExpert:
    """One routed expert whose weights live in the cache: [N, H] -> [N, H]."""

    __slots__ = ("cache", "dtype", "expert", "layer", "module")

    def __init__(self, cache: ExpertCache, module: nn.Module, layer: int, expert: int, dtype: torch.dtype | None):
        self.cache, self.module, self.layer, self.expert, self.dtype = cache, module, layer, expert, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self.cache.hold(self.layer, self.expert) as weights:
            if isinstance(weights, nn.Module):  # a quantized expert bound to its slot (quant_experts.py)
                return weights(x)  # [N, H]
            if self.dtype is not None:  # the checkpoint's dtype differs from the compute dtype
                weights = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in weights.items()}
            return functional_call(self.module, weights, (x,))  # [N, H]


FALLBACKS = ("none", "renormalize", "lowbit")  # --miss-fallback's values
PREFETCH_CHOICES = (*PREFETCHERS, "lookahead")  # --prefetch's values


class TieredExpertProvider:
    def __init__(self, cache: ExpertCache, blocks: list[SparseMoeBlock], dtype: torch.dtype,
                 fallback: str = "none", lowbit: dict[int, list[nn.Module]] | None = None):
        from strata.errors import ConfigError

        if fallback not in FALLBACKS:
            raise ConfigError(f"--miss-fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
        if fallback == "lowbit" and lowbit is None:
            raise ConfigError("--miss-fallback lowbit needs the low-bit expert copies (tiers/lowbit.py)")
        self.cache, self.fallback, self.lowbit = cache, fallback, lowbit
        self._skipped: set[tuple[int, int]] = set()  # experts the previous acquire left out
        self._experts: dict[int, list[TieredExpert]] = {}
        for block in blocks:
            module = block.experts[0]  # every expert of a block shares one architecture
            stored = [DTYPES[t.dtype] for t in cache.store.entry((block.layer_idx, 0)).tensors]
            cast = dtype if any(s.is_floating_point and s != dtype for s in stored) else None
            self._experts[block.layer_idx] = [TieredExpert(cache, module, block.layer_idx, e, cast)
                                              for e in range(block.num_experts)]

    def acquire(self, layer_idx: int, expert_ids: list[int]) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
        experts = self._experts[layer_idx]
        if self.fallback == "none":
            self.cache.request(layer_idx, expert_ids)
            return {e: experts[e] for e in expert_ids}
        stats = self.cache.stats
        # the block asks again for experts left out when a token had none left: those are computed exactly
        stats.fallback_renormalized -= sum((layer_idx, e) in self._skipped for e in set(expert_ids))
        skipped = self.cache.request(layer_idx, expert_ids, skip_misses=True)
        self._skipped = {(layer_idx, e) for e in skipped}
        out = {e: experts[e] for e in expert_ids if e not in skipped}
        if self.fallback == "lowbit":
            out.update({e: self.lowbit[layer_idx][e] for e in skipped})
            stats.fallback_lowbit += len(skipped)
        else:
            stats.fallback_renormalized += len(skipped)
        return out

    @contextmanager
    def hold_all(self, layer_idx: int, expert_ids: list[int]) -> Iterator[dict[int, object] | None]:
        """After acquire(): {expert id: its slot's tensors by name} for all of them at once, resident until the
        block exits (the native grouped-expert call reads them together), or None where that cannot be: a
        miss fallback, weights cast on use, quantized experts (bound modules), or a pool smaller than the
        step's experts. Then the callables acquire() returned serve as before."""
        if self.fallback != "none" or self.cache.bind is not None or self._experts[layer_idx][0].dtype is not None:
            yield None
            return
        with self.cache.hold_all(layer_idx, expert_ids) as held:
            yield held

    def release(self, layer_idx: int, expert_ids: list[int]) -> None:
        self._skipped.clear()
        self.cache.release(layer_idx, expert_ids)


class PrefetchHook:
    """Router hook: policy feedback and next-block prefetch. `kind` is one of PREFETCHERS or "lookahead"."""

    def __init__(self, cache: ExpertCache, blocks: list[SparseMoeBlock], kind: str = "none",
                 min_prob: float = DEFAULT_MIN_PROB, prefetch_k: int | None = None):
        from strata.errors import ConfigError

        if kind not in PREFETCH_CHOICES:
            raise ConfigError(f"--prefetch must be one of {', '.join(PREFETCH_CHOICES)}, got {kind!r}")
        self.cache, self.blocks, self.kind, self.min_prob = cache, blocks, kind, min_prob
        self.position = {b.layer_idx: i for i, b in enumerate(blocks)}  # layer -> index among MoE blocks
        self.k = prefetch_k
        self.predictor = None if kind in ("none", "lookahead") else make_predictor(
            kind, len(blocks), blocks[0].num_experts)

    def __call__(self, block: SparseMoeBlock, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> None:
        ids_l, w_l = ids.tolist(), weights.tolist()
        self.cache.route(block.layer_idx, ids_l, w_l)
        if self.kind == "none":
            return
        i = self.position[block.layer_idx]
        nxt = self.blocks[(i + 1) % len(self.blocks)]
        want = min(nxt.num_experts, (self.k or block.top_k) * len(ids_l))

        def resident(e: int) -> bool:
            return self.cache.is_resident(nxt.layer_idx, e)

        if self.kind == "lookahead":
            if i + 1 == len(self.blocks):
                return  # the next token's first layer depends on a hidden state not computed yet
            ranked = lookahead_experts(nxt.gate.weight, x, nxt.top_k, nxt.num_experts)
            chosen = [e for e in ranked if not resident(e)][:want]
        else:
            self.predictor.observe(i, ids_l, w_l)
            chosen = self.predictor.predict(i, want, self.min_prob, skip=resident)
        if chosen:
            self.cache.prefetch(nxt.layer_idx, chosen)

