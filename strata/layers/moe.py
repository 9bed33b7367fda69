"""Sparse MoE block: router, top-k selection, expert dispatch, optional shared expert.

Experts are addressable one at a time: `experts` is an nn.ModuleList whose entries carry the checkpoint names
(`experts.E.gate_proj`, or `experts.E.w1` for Mixtral). The block asks for expert weights through an
*expert provider* so it never knows whether they live in RAM or come from disk:

    class ExpertProvider(Protocol):
        def acquire(self, layer_idx: int, expert_ids: list[int]) -> Mapping[int, Callable[[Tensor], Tensor]]:
            '''Return a callable (an expert MLP: [N, H] -> [N, H]) per requested expert id, loading as needed.
            The returned experts stay valid until release() for the same layer.'''
        def release(self, layer_idx: int, expert_ids: list[int]) -> None: ...
        # optional: after acquire(), every expert's slot tensors {id: {name: tensor}} at once, or None
        def hold_all(self, layer_idx: int, expert_ids: list[int]) -> ContextManager[dict | None]: ...

`expert_provider is None` means the resident `experts` ModuleList is used directly. A provider may leave an
expert out of the mapping (a miss fallback, strata/tiers/provider.py): the block drops it and rescales each
token's remaining weights to the token's top-k sum; a token left with none asks again for its first choice.
A bf16 decode batch or verification (up to NATIVE_MAX_TOKENS rows) runs its experts in one native grouped call,
resident or, through `hold_all`, from the provider's slots; otherwise one module call per expert. Above
NATIVE_MAX_TOKENS rows (a prompt, a prompt chunk with decodes) resident experts are split by their row count: those
with at most NativeExperts.max_rows rows (moe_native.NATIVE_ROWS) run together in one native grouped call, the
others one module call each (dequantize + GEMM); both add into the same output. When every expert of the step got
at most max_rows rows, the whole step goes to the grouped call, as a decode batch does.

Expert parallel (strata/distributed/expert_parallel.py): `local_experts` names the experts this rank runs;
the block skips the others (no rescaling: another rank adds them when the block's output is all-reduced).

Routing hooks (tiers: recording, prefetch, replay):
- `router_hooks`: callables hook(block, x [T, H], topk_weights [T, k], topk_ids [T, k]) called after routing,
  before the experts run (a prefetcher can start reading the next layer's experts here).
- `routing_override`: callable(block, router_logits [T, E]) -> (topk_weights [T, k] float32, topk_ids [T, k])
  or None; replaces the router's choice (routing replay). Results stay exact only without it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from strata.config import ModelConfig
from strata.layers.linear import Linear
from strata.layers.mlp import MLP
from strata.layers.moe_native import NativeExperts

# Decode batches go to the native grouped-expert call whole; longer steps keep the sorted dispatch, whose expert
# modules reach torch's GEMMs for many rows, and send only the experts with few rows to the grouped call.
NATIVE_MAX_TOKENS = 64


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, expert_factory: Callable[[], nn.Module],
                 cast_weights: bool = True):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        # cast the routing weights to the activations' dtype before scaling expert outputs (Qwen, OLMoE);
        # False keeps them float32 (Mixtral)
        self.cast_weights = cast_weights
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList([expert_factory() for _ in range(cfg.num_experts)])
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None
        self.expert_provider = None
        # expert parallel (strata/distributed/expert_parallel.py): the experts this rank runs; the others add
        # nothing here, their rank's partial sum brings them in the block's all-reduce
        self.local_experts: frozenset[int] | None = None
        self.router_hooks: list[Callable] = []
        self.routing_override: Callable | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_weights [T, k] float32, topk_ids [T, k] int64)."""
        logits = self.gate(x)  # [T, E]
        if self.routing_override is not None:
            return self.routing_override(self, logits)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)  # [T, k], [T, k]
        for hook in self.router_hooks:
            hook(self, x, weights, ids)
        if self.cast_weights:
            weights = weights.to(x.dtype)
        out = self._dispatch(x, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def _dispatch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        # the native grouped call can run: bf16, or float32 (a float32 model's quantized experts)
        grouped_ok = self.local_experts is None and x.dtype in (torch.bfloat16, torch.float32)
        native_ok = T <= NATIVE_MAX_TOKENS and grouped_ok
        resident = self._native_experts() if grouped_ok and self.expert_provider is None else None
        if native_ok and resident is not None:  # one native call for all tokens, grouped by expert (moe_native.py)
            return resident(x, weights, ids)
        if T == 1:  # decode: no sorting, k small matmuls
            chosen = ids[0].tolist()
            expert_ids = self._local(chosen)
            experts = self._acquire(expert_ids)
            if native_ok and (out := self._native_held(x, weights, ids, expert_ids)) is not None:
                self._release(expert_ids)
                return out
            experts, weights, dropped = self._drop_missing(experts, expert_ids, ids, weights)
            out = torch.zeros_like(x)
            for j, e in enumerate(chosen):
                if e not in dropped and self._is_local(e):
                    out += (experts[e](x) * weights[0, j]).to(x.dtype)
            self._release(expert_ids)
            return out
        flat_ids = ids.reshape(-1)  # [T*k]
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        if resident is not None and max(counts) <= resident.max_rows:  # every expert suits the grouped call
            return resident(x, weights, ids)
        order = torch.argsort(flat_ids, stable=True)
        token_idx = order // self.top_k  # [T*k] token of each sorted assignment
        active = self._local([e for e, c in enumerate(counts) if c])
        experts = self._acquire(active)
        if native_ok and (out := self._native_held(x, weights, ids, active)) is not None:
            self._release(active)  # each expert read once for all rows (a verification's union)
            return out
        experts, weights, dropped = self._drop_missing(experts, active, ids, weights)
        flat_w = weights.reshape(-1)[order]  # [T*k]
        out = torch.zeros_like(x)
        ran = set() if resident is None else self._few_rows_native(resident, x, counts, flat_ids[order], token_idx,
                                                                    flat_w, out)
        start = 0
        for e, c in enumerate(counts):
            if not c or e in dropped or e in ran or not self._is_local(e):
                start += c
                continue
            idx = token_idx[start : start + c]
            y = experts[e](x.index_select(0, idx)) * flat_w[start : start + c, None]  # [c, H]
            out.index_add_(0, idx, y.to(x.dtype))
            start += c
        self._release(active)
        return out

    def _native_experts(self):
        native = self.__dict__.get("_native")
        if native is None:  # built once, on the first decode step (after loading and fusion)
            native = NativeExperts.build(self.experts) or False
            self.__dict__["_native"] = native  # not a submodule: no state-dict entries
        return native or None

    def _few_rows_native(self, native: NativeExperts, x: torch.Tensor, counts: list[int], sorted_ids: torch.Tensor,
                         token_idx: torch.Tensor, flat_w: torch.Tensor, out: torch.Tensor) -> set[int]:
        """The resident experts that got at most native.max_rows rows (moe_native.NATIVE_ROWS) run together in one
        native grouped call (no slower than the expert modules there, and without their torch ops per expert),
        added into out [T, H]. sorted_ids, token_idx, flat_w [T*k]: the assignments sorted by expert. -> the
        experts it ran."""
        few = [e for e, c in enumerate(counts) if 0 < c <= native.max_rows]
        if not few:
            return set()
        picked = torch.zeros(self.num_experts, dtype=torch.bool)
        picked[few] = True
        sel = picked[sorted_ids]  # [T*k] the assignments to those experts
        idx = token_idx[sel]  # [A]
        y = native(x.index_select(0, idx), flat_w[sel, None], sorted_ids[sel, None])  # [A, H], one expert per row
        out.index_add_(0, idx, y)
        return set(few)

    def _native_held(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                     expert_ids: list[int]) -> torch.Tensor | None:
        """After _acquire: the provider's slots of every routed expert held at once, through the native grouped
        call; None where the provider cannot hold them together or their tensors do not suit the kernel."""
        hold_all = getattr(self.expert_provider, "hold_all", None)
        if hold_all is None or self.__dict__.get("_native_slots") is False:
            return None
        with hold_all(self.layer_idx, expert_ids) as held:
            if held is None:
                return None
            native = NativeExperts.from_slots(self.experts[0], held, self.num_experts)
            if native is None:
                self.__dict__["_native_slots"] = False  # the store's layout and formats do not change
                return None
            return native(x, weights, ids)

    def _drop_missing(self, experts, expert_ids: list[int], ids: torch.Tensor, weights: torch.Tensor):
        """-> (experts, weights [T, k] rescaled over the experts served, ids left out)."""
        if self.expert_provider is None:
            return experts, weights, ()
        dropped = {e for e in expert_ids if e not in experts}
        if not dropped:
            return experts, weights, dropped
        gone = torch.isin(ids, torch.tensor(sorted(dropped)))  # [T, k]
        starved = gone.all(dim=-1)  # [T] tokens with no expert left
        if starved.any():
            experts = {**experts, **self.expert_provider.acquire(self.layer_idx, ids[starved, 0].unique().tolist())}
            dropped = {e for e in dropped if e not in experts}
            gone = torch.isin(ids, torch.tensor(sorted(dropped), dtype=ids.dtype))  # [T, k]
        kept = weights.masked_fill(gone, 0)  # [T, k]
        total, left = weights.sum(-1, keepdim=True), kept.sum(-1, keepdim=True)  # [T, 1]
        return experts, kept * torch.where(left > 0, total / left, torch.zeros_like(left)), dropped

    def _is_local(self, e: int) -> bool:
        return self.local_experts is None or e in self.local_experts

    def _local(self, expert_ids: list[int]) -> list[int]:
        return [e for e in expert_ids if self._is_local(e)]

    def _acquire(self, expert_ids: list[int]):
        if self.expert_provider is None:
            return self.experts
        return self.expert_provider.acquire(self.layer_idx, expert_ids)

    def _release(self, expert_ids: list[int]) -> None:
        if self.expert_provider is not None:
            self.expert_provider.release(self.layer_idx, expert_ids)
