"""Memory budget planning: everything the process holds is planned against --memory-budget.

fixed = runtime (the interpreter, torch, tokenizer: measured RSS before loading weights)
      + resident weights (everything but routed experts) + KV cache + activations + I/O buffers;
the expert cache gets what is left, as whole slots of `slot_bytes` (the largest expert, 4 KiB padded).
When even `min_slots` slots do not fit, `plan_memory` refuses with the smallest budget that would work.

Experts of different sizes (a `--mixed` plan: int8 experts beside int4 ones) get one pool per size
(`slot_classes`), each slot the size of its experts. The rule (`split_slots`): every class first gets
`min(its experts, min_slots_per_class)` slots, then slots go one at a time to the class holding the
smallest share of its experts that still fits, so each size keeps about the same fraction of its experts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from strata import units
from strata.config import ModelConfig
from strata.errors import StrataError
from strata.layers.kv_cache import KVCacheSpec, kv_bytes_per_token
from strata.units import format_size


class BudgetError(StrataError):
    """The memory budget cannot hold what must stay resident, or a size does not parse."""


def parse_size(text: str | int) -> int:
    try:
        return units.parse_size(text)
    except ValueError as e:
        raise BudgetError(f"memory size {text!r} does not parse: {e}") from None


def current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


@dataclass
class MemoryPlan:
    budget_bytes: int
    runtime_bytes: int
    resident_bytes: int
    kv_bytes: int
    activation_bytes: int
    io_buffer_bytes: int
    slot_bytes: int
    num_slots: int
    max_slots: int  # slots that would hold every expert
    lowbit_bytes: int = 0  # resident low-bit copies of every expert (--miss-fallback lowbit)
    class_bytes: list[int] | None = None  # slot size of each size class (experts of different sizes)
    class_slots: list[int] | None = None  # slots of each class (they add up to num_slots)
    class_max: list[int] | None = None  # experts of each class
    max_num_batched_tokens: int = 0  # the step token budget the activations were planned for (0: not set)

    @property
    def fixed_bytes(self) -> int:
        return (self.runtime_bytes + self.resident_bytes + self.kv_bytes + self.activation_bytes
                + self.io_buffer_bytes + self.lowbit_bytes)

    @property
    def expert_cache_bytes(self) -> int:
        if self.class_slots:
            return sum(n * b for n, b in zip(self.class_slots, self.class_bytes))
        return self.num_slots * self.slot_bytes

    @property
    def all_experts_fit(self) -> bool:
        return self.num_slots >= self.max_slots

    def to_dict(self) -> dict:
        return {**asdict(self), "fixed_bytes": self.fixed_bytes, "expert_cache_bytes": self.expert_cache_bytes}

    def describe(self) -> str:
        parts = [f"budget {format_size(self.budget_bytes)}", f"runtime {format_size(self.runtime_bytes)}",
                 f"resident weights {format_size(self.resident_bytes)}", f"KV cache {format_size(self.kv_bytes)}",
                 f"activations {format_size(self.activation_bytes)}"
                 + (f" (steps of {self.max_num_batched_tokens} tokens)" if self.max_num_batched_tokens else ""),
                 *([f"low-bit experts {format_size(self.lowbit_bytes)}"] if self.lowbit_bytes else []),
                 f"expert cache {self._slots_text()}"]
        return ", ".join(parts)

    def _slots_text(self) -> str:
        if not self.class_slots:
            return f"{self.num_slots}/{self.max_slots} slots x {format_size(self.slot_bytes)}"
        return " + ".join(f"{n}/{m} slots x {format_size(b)}"
                          for n, m, b in zip(self.class_slots, self.class_max, self.class_bytes))


def split_slots(spare: int, classes: list[tuple[int, int]], min_slots_per_class: int) -> list[int] | None:
    """Slots per size class ((slot bytes, experts) each) within `spare` bytes, by the rule in the module
    docstring; None when even the minimum of every class does not fit."""
    slots = [min(n, min_slots_per_class) for _, n in classes]
    left = spare - sum(s * b for s, (b, _) in zip(slots, classes))
    if left < 0:
        return None
    while True:
        open_ = [i for i, (b, n) in enumerate(classes) if slots[i] < n and b <= left]
        if not open_:
            return slots
        i = min(open_, key=lambda i: (slots[i] / classes[i][1], -classes[i][0]))
        slots[i] += 1
        left -= classes[i][0]


def plan_memory(budget: int | str, *, resident_bytes: int, slot_bytes: int, max_slots: int, min_slots: int = 1,
                kv_bytes: int = 0, activation_bytes: int = 0, io_buffer_bytes: int = 0,
                runtime_bytes: int | None = None, lowbit_bytes: int = 0,
                slot_classes: list[tuple[int, int]] | None = None, min_slots_per_class: int = 1) -> MemoryPlan:
    """slot_classes: (slot bytes, experts) per size class when experts differ in size (then slot_bytes is the
    largest and max_slots their total)."""
    budget_bytes = parse_size(budget)
    runtime = current_rss() if runtime_bytes is None else runtime_bytes
    plan = MemoryPlan(budget_bytes, runtime, resident_bytes, kv_bytes, activation_bytes, io_buffer_bytes,
                      slot_bytes, 0, max_slots, lowbit_bytes)
    spare = budget_bytes - plan.fixed_bytes
    if slot_classes and len(slot_classes) > 1:
        return _plan_classes(plan, spare, slot_classes, min_slots_per_class)
    plan.num_slots = max(0, min(max_slots, spare // slot_bytes if slot_bytes else max_slots))
    need_slots = min(min_slots, max_slots)
    if plan.num_slots < need_slots:
        raise _too_small(plan, f"{need_slots} expert slots x {format_size(slot_bytes)}", need_slots * slot_bytes)
    return plan


def _too_small(plan: MemoryPlan, slots: str, slot_bytes: int) -> BudgetError:
    minimum = plan.fixed_bytes + slot_bytes
    low = f"low-bit experts {format_size(plan.lowbit_bytes)} + " if plan.lowbit_bytes else ""
    return BudgetError(
        f"--memory-budget {format_size(plan.budget_bytes)} is too small: runtime "
        f"{format_size(plan.runtime_bytes)} + resident weights {format_size(plan.resident_bytes)} + KV cache "
        f"{format_size(plan.kv_bytes)} + activations {format_size(plan.activation_bytes + plan.io_buffer_bytes)} "
        f"+ {low}{slots} need {format_size(minimum)}; the minimum that would work is --memory-budget "
        f"{_round_up_mib(minimum)}")


def _plan_classes(plan: MemoryPlan, spare: int, classes: list[tuple[int, int]], min_each: int) -> MemoryPlan:
    plan.class_bytes, plan.class_max = [b for b, _ in classes], [n for _, n in classes]
    plan.class_slots = split_slots(spare, classes, min_each)
    if plan.class_slots is None:
        need = [min(n, min_each) for _, n in classes]
        slots = " + ".join(f"{k} x {format_size(b)}" for k, (b, _) in zip(need, classes))
        raise _too_small(plan, f"expert slots {slots}", sum(k * b for k, (b, _) in zip(need, classes)))
    plan.num_slots = sum(plan.class_slots)
    return plan


def _round_up_mib(n: int) -> str:
    mib = -(-n // (1 << 20))
    return f"{mib / 1024:.2f}GiB" if mib >= 1024 else f"{mib}MiB"


def min_slots_for(layout: str, num_layers: int, top_k: int) -> int:
    """Slots the cache cannot run below: a global pool holds one layer's experts plus a prefetched
    layer's; a per-layer pool needs one slot per layer."""
    return 2 * top_k if layout == "global" else num_layers


def estimate_kv_bytes(specs: list[KVCacheSpec], max_tokens: int, dtype: torch.dtype, batch: int = 1) -> int:
    """KV-cache bytes of `batch` sequences of `max_tokens` tokens, from the model's per-layer cache spec."""
    return kv_bytes_per_token(specs, dtype) * max_tokens * batch


def estimate_activation_bytes(cfg: ModelConfig, num_tokens: int, context_len: int, num_seqs: int,
                              dtype_bytes: int = 4, stored_dtype_bytes: int | None = None) -> int:
    """Peak temporary bytes of one engine step of `num_tokens` tokens (at most `num_seqs` sampled rows, contexts
    of at most `context_len` tokens), from the model's shapes. Upper bound: the buffers are summed as if all
    lived at once, though each layer frees its own before the next.

    - hidden states: the layer input, residual, norm output, attention output and o_proj output [T, H];
    - attention: q/k/v and their rotated copies [T, (Hq + 2 Hkv) D]; one sequence's context gathered from the
      KV cache, as wide as the query heads should GQA expand it [ctx, Hq, D] x 2; SDPA's CPU kernel works in
      query and key blocks (measured: 11 MiB for 16 heads over 4,000 positions, not the [Hq, Q, ctx] scores);
    - MLP or MoE dispatch: router logits and probabilities [T, E] float32, the sorted assignments [T k], the
      gathered tokens of one expert and their gate, up and activation [c, 3 I] with c <= T, the expert output
      [c, H] and the block output [T, H]; an expert stored in another dtype is cast first (3 H I);
    - logits of the sampled rows [N, V] float32 and the sampler's copies of them (softmax, sort)."""
    t, h, e = num_tokens, cfg.hidden_size, dtype_bytes
    d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    hidden = 5 * t * h * e
    attention = 2 * t * (hq + 2 * hkv) * d * e + 2 * context_len * hq * d * e + t * hq * d * e
    mlp = 3 * t * cfg.intermediate_size * e + t * h * e
    if cfg.is_moe:
        inter = cfg.moe_intermediate_size
        router = 2 * t * cfg.num_experts * 4 + 3 * t * cfg.num_experts_per_tok * 8
        moe = router + t * (3 * inter + 3 * h) * e
        if stored_dtype_bytes and stored_dtype_bytes != dtype_bytes:
            moe += 3 * h * inter * e
        if cfg.shared_expert_intermediate_size:
            moe += t * (3 * cfg.shared_expert_intermediate_size + h) * e
        mlp = max(mlp, moe)
    logits = 4 * num_seqs * cfg.vocab_size * 4
    return hidden + attention + mlp + logits
