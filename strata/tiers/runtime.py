"""Engine side of the tiers: load a model under --memory-budget, route recording/replay, statistics.

`load_model_tiered(path, config)` is what LLMEngine calls instead of load_model. Without a budget (or
when every expert fits in it) the model loads as usual. Otherwise, in this order: plan the budget
from the checkpoint headers (refusing before any conversion when even the minimum does not fit),
build or reuse the expert-major store, load everything but the experts (which stay on the meta
device), allocate the slot pool once, and point every SparseMoeBlock at a TieredExpertProvider.
--record-routing and --replay-routing hook the blocks with or without a budget.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

import torch

from strata.config import EngineConfig, ModelConfig
from strata.errors import ConfigError, WeightsError
from strata.tiers.budget import (
    BudgetError,
    MemoryPlan,
    current_rss,
    estimate_activation_bytes,
    estimate_kv_bytes,
    format_size,
    min_slots_for,
    plan_memory,
)
from strata.tiers.retention import bound_retention
from strata.tiers.trace import RoutingRecorder, RoutingReplay, read_trace

log = logging.getLogger("strata.tiers")
# RSS the first forward adds beyond its tensors (kernel set-up, allocator pools, tokenizer buffers):
# measured at about 12 MiB on a small Mixtral (tests/tiers/test_rss.py), rounded up.
FIRST_FORWARD_GROWTH = 16 << 20
# the smallest step token budget a plan lowers --max-num-batched-tokens to before it refuses the budget
MIN_STEP_TOKENS = 64


class TierRuntime:
    """What the tiers attached to one engine: the cache (or None), the plan, recording and replay."""

    def __init__(self, model, config: EngineConfig, plan: MemoryPlan | None = None, cache=None, store=None):
        self.model, self.config, self.plan, self.cache, self.store = model, config, plan, cache, store
        self.blocks = model.moe_blocks()
        self.recorder = RoutingRecorder(config.record_routing) if config.record_routing else None
        self.replay = None
        if config.replay_routing:
            b = self.blocks[0]
            self.replay = RoutingReplay(read_trace(config.replay_routing), b.num_experts, b.top_k)
        self._request_index: dict[str, int] = {}
        self._rows: list[tuple[str, int, int]] = []  # (request label, request index, position) per row
        if self.recorder:
            atexit.register(self.close)
        for block in self.blocks:
            if self.replay:
                block.routing_override = self._override
            if self.recorder:
                block.router_hooks.append(self._record)

    # ---- rows of the current forward ------------------------------------------------------------
    def label_rows(self, rows: list[tuple[str, int]]) -> None:
        """(request label, position) of each row of the next forward, in row order; the engine calls this
        before every step (LLMEngine.step: ScheduledBatch.row_labels()). A forward whose row count differs
        (outside the engine) is labelled by position."""
        index = self._request_index
        self._rows = [(label, index.setdefault(label, len(index)), pos) for label, pos in rows]

    def _rows_for(self, block) -> list[tuple[str, int, int]]:
        return self._rows

    def _override(self, block, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows_for(block)
        if len(rows) != logits.shape[0]:  # a forward outside the engine: label rows by position
            rows = [("", 0, p) for p in range(logits.shape[0])]
        picks = [self.replay.lookup(idx, pos, block.layer_idx) for _, idx, pos in rows]
        ids = torch.tensor([p[0] for p in picks], dtype=torch.long)  # [T, k]
        weights = torch.tensor([p[1] for p in picks], dtype=torch.float32)  # [T, k]
        return weights, ids

    def _record(self, block, x, weights: torch.Tensor, ids: torch.Tensor) -> None:
        rows = self._rows_for(block)
        if len(rows) != ids.shape[0]:
            rows = [("", 0, p) for p in range(ids.shape[0])]
        for (label, _, pos), ex, ws in zip(rows, ids.tolist(), weights.tolist()):
            self.recorder.record(label, pos, block.layer_idx, ex, ws)

    # ---- statistics --------------------------------------------------------------------------------
    def stats(self, generated_tokens: int | None = None) -> dict:
        if self.cache is None:
            return {"tiered": False}
        st = self.cache.stats
        per_tok = generated_tokens or None
        return {
            "tiered": True,
            "expert_hit_rate": st.hit_rate,
            "prefetch_coverage": st.prefetch_coverage,
            "prefetch_waste_bytes": st.prefetch_waste_bytes,
            "disk_bytes_read": st.disk_bytes_read,
            "io_stall_s": st.io_stall_s,
            "disk_read_s": st.disk_read_s,
            "disk_read_gb_s": st.disk_read_gb_s,
            "disk_bytes_per_token": st.disk_bytes_read / per_tok if per_tok else None,
            "io_stall_s_per_token": st.io_stall_s / per_tok if per_tok else None,
            "expert_accesses": st.accesses,
            "expert_misses": st.misses,
            "prefetch_issued": st.prefetch_issued,
            "expert_cache_slots": self.cache.num_slots,
            "expert_slot_bytes": self.cache.slot_bytes,
            "expert_cache_bytes": self.plan.expert_cache_bytes if self.plan else None,
            "expert_cache_policy": self.config.expert_cache_policy,
            "prefetch": self.config.prefetch,
            "miss_fallback": self.config.miss_fallback,
            "fallback_renormalized": st.fallback_renormalized,
            "fallback_lowbit": st.fallback_lowbit,
            "direct_io": self.store.direct_io,
            "memory_plan": self.plan.to_dict() if self.plan else None,
        }

    def close(self) -> None:
        if self.recorder:
            self.recorder.close()
        if self.cache is not None:
            self.cache.close()  # stops the I/O threads; the counters stay readable


def _plan(path: str, config: EngineConfig, cfg: ModelConfig, dtype: torch.dtype, facts,
          lowbit: bool = False) -> MemoryPlan:
    """The plan for --max-num-batched-tokens, or, where that step's activations leave too little of the
    budget, for the largest smaller step token budget (halving down to MIN_STEP_TOKENS) that fits."""
    tokens = config.max_num_batched_tokens
    while True:
        try:
            return _plan_for(config, cfg, dtype, facts, lowbit, tokens)
        except BudgetError:
            if tokens <= MIN_STEP_TOKENS:
                raise
            tokens = max(tokens // 2, MIN_STEP_TOKENS)


def _plan_for(config: EngineConfig, cfg: ModelConfig, dtype: torch.dtype, facts, lowbit: bool,
              step_tokens: int) -> MemoryPlan:
    from strata.models.registry import model_class

    elem = torch.empty(0, dtype=dtype).element_size()
    max_len = config.max_model_len or min(cfg.max_position_embeddings, 4096)
    # the KV cache as LLMEngine sizes it: whole blocks, at most kv_cache_memory, at most what is wanted
    family = model_class(cfg)
    per_block = estimate_kv_bytes(family.kv_cache_spec_for(cfg), config.block_size, dtype)
    wanted = config.max_num_seqs * -(-max_len // config.block_size)
    kv = max(min(wanted, config.kv_cache_memory // per_block), 1) * per_block
    from strata.weights.loader import DTYPES

    stored = DTYPES.get(cfg.torch_dtype, torch.float32).itemsize
    act = estimate_activation_bytes(cfg, step_tokens, min(max_len, kv // per_block * config.block_size),
                                    config.max_num_seqs, elem, stored) + FIRST_FORWARD_GROWTH
    with torch.device("meta"):  # the first meta build imports torch's symbolic stack (~80 MB): runtime, not weights
        family(cfg)
    plan = plan_memory(config.memory_budget, runtime_bytes=current_rss(), resident_bytes=facts.resident_bytes(elem),
                       kv_bytes=kv, activation_bytes=act, slot_bytes=facts.slot_bytes, max_slots=facts.num_experts,
                       lowbit_bytes=facts.lowbit_bytes if lowbit else 0,
                       min_slots=min_slots_for("global", cfg.num_hidden_layers, cfg.num_experts_per_tok),
                       slot_classes=list(facts.slot_classes), min_slots_per_class=cfg.num_experts_per_tok)
    plan.max_num_batched_tokens = step_tokens
    return plan


def load_model_tiered(path: str, config: EngineConfig, progress: bool = True, shard=None):
    """Returns (model, TierRuntime or None). One load path: plan the memory (an MoE model under
    --memory-budget), load the model once (the offloaded experts left on the meta device), then place the
    experts from the plan (a slot cache over the expert store) and attach routing record/replay. `shard`: one
    expert-parallel rank's part (strata/distributed), whose tiers hold that rank's experts only (the budget is
    the rank's)."""
    from strata.tiers.store import ExpertStore
    from strata.tiers.store_convert import ensure_store, is_expert_tensor
    from strata.weights.loader import load_model

    plan = _plan_budget(path, config) if config.memory_budget else None
    offload = plan is not None and not plan.all_experts_fit
    store = ExpertStore(ensure_store(path, progress=progress)) if offload else None  # converted on first use
    model = load_model(path, dtype=config.dtype, skip=is_expert_tensor if offload else None, progress=progress,
                       check_finite=config.check_weights, shard=shard)
    _set_activations(model, config.quantized_activations)
    if offload:
        return model, _place_experts(model, config, plan, store, progress)
    if plan is not None:
        log.info("memory budget holds every expert; loading them resident (%s)", plan.describe())
    hooked = (config.record_routing or config.replay_routing) and model.config.is_moe
    return model, (TierRuntime(model, config, plan) if hooked else None)


def _set_activations(model, mode: str) -> None:
    """--quantized-activations on the model's quantized linear layers (logged when none can use it)."""
    from strata.layers.quant_linear import set_quantized_activations

    if set_quantized_activations(model, mode) == 0 and mode != "none":
        log.warning("--quantized-activations %s: no quantized layer of this model has an int8-activation kernel "
                    "on this machine (needs AVX-512 VNNI and a format in quant_native.A8_KINDS); keeping bf16", mode)


def _plan_budget(path: str, config: EngineConfig) -> MemoryPlan | None:
    """The memory plan of an MoE checkpoint under --memory-budget (None for a dense one); lowers
    config.max_num_batched_tokens where a step's activations must shrink to fit."""
    from strata.models.registry import load_config
    from strata.tiers.provider import FALLBACKS
    from strata.tiers.store_convert import checkpoint_facts
    from strata.weights.loader import resolve_dtype

    bound_retention()  # before the first matmul: the libraries read their cache sizes then
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: model folder not found")
    cfg = load_config(path)
    if not cfg.is_moe:
        return None
    if config.miss_fallback not in FALLBACKS:
        raise ConfigError(f"--miss-fallback must be one of {', '.join(FALLBACKS)}, got {config.miss_fallback!r}")
    dtype = resolve_dtype(config.dtype, cfg)
    facts = checkpoint_facts(path)
    plan = _plan(path, config, cfg, dtype, facts)
    if not plan.all_experts_fit and config.miss_fallback == "lowbit":  # the low-bit copies take their share
        plan = _plan(path, config, cfg, dtype, facts, lowbit=True)
    if plan.max_num_batched_tokens < config.max_num_batched_tokens:
        log.warning("--max-num-batched-tokens lowered from %d to %d: a step's activations must fit --memory-budget "
                    "(%s)", config.max_num_batched_tokens, plan.max_num_batched_tokens, plan.describe())
        config.max_num_batched_tokens = plan.max_num_batched_tokens  # the scheduler's step token budget
    return plan


def _place_experts(model, config: EngineConfig, plan: MemoryPlan, store, progress: bool) -> TierRuntime:
    """Serve the experts that the load left on the meta device from a slot cache over the store."""
    from strata.tiers.cache import ExpertCache
    from strata.tiers.provider import PrefetchHook, TieredExpertProvider
    from strata.tiers.quant_experts import expert_binder
    from strata.tiers.store import StoreError
    from strata.weights.loader import resolve_dtype

    dtype = resolve_dtype(config.dtype, model.config)
    blocks = model.moe_blocks()
    if plan.class_slots and store.class_bytes != plan.class_bytes:
        raise StoreError(f"{store.path}: expert sizes {store.class_bytes} differ from the checkpoint's "
                         f"{plan.class_bytes}; delete the store to rebuild it")
    cache = ExpertCache(store, plan.num_slots, config.expert_cache_policy, "global", io_workers=1, populate=True,
                        bind=expert_binder(blocks, dtype), class_slots=plan.class_slots)
    lowbit = None
    if config.miss_fallback == "lowbit":
        from strata.tiers.lowbit import build_lowbit_experts

        lowbit = build_lowbit_experts(store, blocks, dtype, progress=progress)
    provider = TieredExpertProvider(cache, blocks, dtype, config.miss_fallback, lowbit)
    hook = PrefetchHook(cache, blocks, config.prefetch)
    for block in blocks:
        block.expert_provider = provider
        block.router_hooks.append(hook)
    if progress:
        print(f"tiered experts: {plan.describe()}; {'O_DIRECT' if store.direct_io else 'buffered'} reads",
              file=sys.stderr)
    log.info("tiered experts: %s (expert cache %s)", plan.describe(), format_size(plan.expert_cache_bytes))
    return TierRuntime(model, config, plan, cache, store)
