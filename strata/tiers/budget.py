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

from strata import units
from strata.errors import StrataError
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
                 f"activations {format_size(self.activation_bytes)}",
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


def estimate_kv_bytes(num_layers: int, num_kv_heads: int, head_dim: int, max_tokens: int,
                      dtype_bytes: int = 2, batch: int = 1) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * max_tokens * batch * dtype_bytes


def estimate_activation_bytes(hidden_size: int, intermediate_size: int, vocab_size: int, num_tokens: int,
                              dtype_bytes: int = 4) -> int:
    """Peak live activations of one forward over num_tokens: a few hidden-sized buffers, one MLP
    intermediate (gate and up) and the logits."""
    return num_tokens * (8 * hidden_size + 3 * intermediate_size + vocab_size) * dtype_bytes
