"""Hand-computed FLOPs and bytes for tiny dense, MQA, MoE-with-shared-expert and MLA configs."""

import pytest

from strata.analysis.operators import build_ops, distinct_experts, kv_cache_bytes, weight_bytes
from strata.analysis.precision import Precisions
from strata.analysis.shapes import shape_from_dict

BF16 = Precisions("bf16", activations="bf16", kv="bf16")


def llama(kv_heads=4, layers=2):
    return shape_from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": kv_heads,
                            "vocab_size": 100})


def op(ops, name, layer=0):
    return next(o for o in ops if o.name == name and o.layer == layer)


def test_dense_decode_projection_and_attention():
    ops = build_ops(llama(), BF16, batch=1, new=1, past=10)
    q = op(ops, "q_proj")
    assert (q.flops, q.weight_bytes, q.act_bytes) == (2 * 64 * 64, 64 * 64 * 2, (64 + 64) * 2)
    a = op(ops, "attention")
    assert a.flops == 2 * 11 * 4 * (16 + 16)  # 11 keys, 4 heads, QK and SV of head_dim 16
    assert a.kv_bytes == 11 * (2 * 4 * 16) * 2  # read 10 cached + write 1, K and V, bf16
    mlp = op(ops, "mlp")
    assert mlp.flops == 2 * 3 * 64 * 128 and mlp.weight_bytes == 3 * 64 * 128 * 2
    head = op(ops, "lm_head", -1)
    assert head.flops == 2 * 64 * 100


def test_gqa_reads_kv_heads_not_query_heads():
    mqa = build_ops(llama(kv_heads=1), BF16, batch=2, new=1, past=10)
    a = op(mqa, "attention")
    assert a.kv_bytes == 2 * 11 * (2 * 1 * 16) * 2
    assert a.flops == 2 * 2 * 11 * 4 * 32  # FLOPs still scale with query heads
    assert op(mqa, "k_proj").weight_bytes == 64 * 16 * 2


def test_prefill_is_causal_and_lm_head_runs_once_per_sequence():
    ops = build_ops(llama(), BF16, batch=1, new=4, past=0)
    a = op(ops, "attention")
    assert a.flops == 2 * (1 + 2 + 3 + 4) * 4 * 32
    assert a.kv_bytes == 4 * 128 * 2  # only writes
    assert op(ops, "lm_head", -1).flops == 2 * 64 * 100
    assert kv_cache_bytes(llama(), BF16, batch=2, tokens=100) == 2 * 100 * 128 * 2 * 2


def moe():
    return shape_from_dict({"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 64,
                            "intermediate_size": 96, "moe_intermediate_size": 32,
                            "shared_expert_intermediate_size": 48, "num_hidden_layers": 1,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 8,
                            "num_experts_per_tok": 2, "vocab_size": 100})


def test_moe_routed_and_shared_experts():
    s = moe()
    ops = build_ops(s, BF16, batch=1, new=1, past=0)
    e = op(ops, "experts")
    assert e.flops == 2 * 2 * 3 * 64 * 32 and e.weight_bytes == 2 * 3 * 64 * 32 * 2
    assert op(ops, "shared_expert").flops == 2 * 3 * 64 * 48
    assert op(ops, "router").flops == 2 * 64 * 8
    four = op(build_ops(s, BF16, batch=4, new=1, past=0), "experts")
    assert four.weight_bytes == pytest.approx(8 * (1 - 0.75 ** 4) * 3 * 64 * 32 * 2)
    assert four.flops == 4 * e.flops
    assert distinct_experts(8, 2, 10_000) == pytest.approx(8)
    wb = weight_bytes(s, BF16)
    assert wb["experts"] == 8 * 3 * 64 * 32 * 2
    counts = s.param_counts()
    assert counts["total"] - counts["active"] == 6 * 3 * 64 * 32


def mla():
    return shape_from_dict({"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
                            "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 16,
                            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
                            "n_routed_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
                            "q_lora_rank": None, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                            "qk_rope_head_dim": 8, "v_head_dim": 16, "vocab_size": 100})


def test_mla_caches_the_latent_and_absorbs_in_decode():
    s = mla()
    assert s.kv_elems_per_token(0) == 32 + 8
    dec = op(build_ops(s, BF16, batch=1, new=1, past=10), "attention")
    assert dec.kv_bytes == 11 * 40 * 2
    assert dec.flops == 2 * 11 * 4 * ((32 + 8) + 32)
    pre = op(build_ops(s, BF16, batch=1, new=4, past=0), "attention")
    assert pre.flops == 2 * 10 * 4 * ((16 + 8) + 16)
    names = {o.name: o for o in build_ops(s, BF16, batch=1, new=1, past=0) if o.layer == 0}
    assert names["q_proj"].weight_bytes == 64 * 4 * 24 * 2
    assert names["kv_a_proj"].weight_bytes == 64 * 40 * 2
    assert names["kv_b_proj"].weight_bytes == 32 * 4 * (16 + 16) * 2
    assert names["o_proj"].weight_bytes == 4 * 16 * 64 * 2
    assert kv_cache_bytes(s, BF16, 1, 100) == 100 * 40 * 2


def test_presets_match_published_parameter_counts():
    from strata.analysis.shapes import load_shape

    for name, total, active in (("llama-2-7b", 6.74, 6.74), ("mixtral-8x7b", 46.7, 12.9),
                                ("deepseek-v3", 671, 37), ("qwen3-30b-a3b", 30.5, 3.3), ("olmoe", 6.9, 1.3)):
        c = load_shape(name).param_counts()
        assert c["total"] / 1e9 == pytest.approx(total, rel=0.02)
        assert c["active"] / 1e9 == pytest.approx(active, rel=0.03)
