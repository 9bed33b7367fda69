"""Memory budget: size parsing, planning, and the refusal message with the minimum that would work."""

from __future__ import annotations

import pytest

from strata.tiers.budget import BudgetError, min_slots_for, parse_size, plan_memory, split_slots

GiB, MiB = 1 << 30, 1 << 20


@pytest.mark.parametrize("text,value", [("3GiB", 3 * GiB), ("3G", 3 * GiB), ("512MB", 512 * 10**6),
                                        ("1.5 GiB", int(1.5 * GiB)), ("4096", 4096), ("2mib", 2 * MiB)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_error():
    with pytest.raises(BudgetError, match=r"memory size '3 apples' does not parse"):
        parse_size("3 apples")


def test_plan_gives_the_rest_to_expert_slots():
    plan = plan_memory("3GiB", runtime_bytes=300 * MiB, resident_bytes=1 * GiB, kv_bytes=256 * MiB,
                       activation_bytes=64 * MiB, slot_bytes=100 * MiB, max_slots=1000, min_slots=4)
    assert plan.num_slots == (3 * GiB - 1644 * MiB) // (100 * MiB) == 14
    assert plan.fixed_bytes + plan.expert_cache_bytes <= 3 * GiB
    assert not plan.all_experts_fit
    small = plan_memory("100GiB", runtime_bytes=0, resident_bytes=0, slot_bytes=MiB, max_slots=10)
    assert small.num_slots == 10 and small.all_experts_fit


def test_refusal_names_the_minimum_and_the_minimum_works():
    kw = {"runtime_bytes": 300 * MiB, "resident_bytes": GiB, "kv_bytes": 256 * MiB, "activation_bytes": 64 * MiB,
          "slot_bytes": 336 * MiB, "max_slots": 256, "min_slots": min_slots_for("global", 32, 2)}
    with pytest.raises(BudgetError) as e:
        plan_memory("2GiB", **kw)
    msg = str(e.value)
    assert "\n" not in msg
    assert "--memory-budget 2.00 GiB is too small" in msg and "4 expert slots x 336.00 MiB" in msg
    minimum = msg.rsplit("--memory-budget ", 1)[1]
    assert minimum == "2.92GiB"  # 300 + 1024 + 256 + 64 + 4 * 336 MiB = 2988 MiB
    assert plan_memory(minimum, **kw).num_slots == 4


def test_split_slots_gives_each_size_class_the_same_share():
    assert split_slots(1500, [(100, 20), (50, 20)], 2) == [10, 10]
    # [1, 1] -> the class with the smaller share that still fits takes the next slot: [2, 1], [3, 1], [3, 2]
    assert split_slots(430, [(100, 10), (50, 5)], 1) == [3, 2]
    assert split_slots(10**9, [(100, 3), (50, 2)], 2) == [3, 2]
    assert split_slots(100, [(100, 3), (50, 3)], 1) is None


def test_size_classes_plan_and_refusal():
    kw = {"runtime_bytes": 0, "resident_bytes": 1000, "slot_bytes": 100, "max_slots": 30,
          "slot_classes": [(100, 10), (50, 20)], "min_slots_per_class": 2}
    plan = plan_memory(1000 + 100 * 5 + 50 * 10, **kw)
    assert plan.class_slots == [5, 10] and plan.num_slots == 15 and plan.expert_cache_bytes == 1000
    assert "5/10 slots x 100 B + 10/20 slots x 50 B" in plan.describe().replace("Bytes", "B")
    with pytest.raises(BudgetError, match=r"expert slots 2 x .* \+ 2 x .*--memory-budget 1MiB"):
        plan_memory(1200, **kw)


def test_activation_estimate_covers_context_dispatch_and_sampled_logits():
    from strata.config import ModelConfig
    from strata.tiers.budget import estimate_activation_bytes

    cfg = ModelConfig(architecture="MixtralForCausalLM", model_type="mixtral", head_dim=32, hidden_size=512,
                      intermediate_size=1536, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=32000, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=1536)
    base = estimate_activation_bytes(cfg, 512, 1024, 1, dtype_bytes=2)
    # the context gathered for attention: [ctx, Hq, D] keys and values
    assert estimate_activation_bytes(cfg, 512, 3072, 1, 2) - base == 2 * 2048 * 16 * 32 * 2
    # logits and the sampler's copies of them for the sampled rows only, not for every token of the step
    assert estimate_activation_bytes(cfg, 512, 1024, 9, 2) - base == 4 * 8 * 32000 * 4
    # the tokens of one expert and their gate, up and activation grow with the step's tokens
    assert estimate_activation_bytes(cfg, 1024, 1024, 1, 2) > base + 512 * 3 * 1536 * 2
    # experts stored in float32 are cast to the compute dtype before they run
    assert estimate_activation_bytes(cfg, 512, 1024, 1, 2, stored_dtype_bytes=4) - base == 3 * 512 * 1536 * 2
