"""The cost model's efficiency terms: overhead per kernel call, dequantizing-GEMV efficiency (eta_q), looped
experts, Strata's measured per-format GEMV rates, and the engine-ratio fallback."""

from dataclasses import replace

import pytest

from strata.analysis.efficiency import Eff, Efficiencies
from strata.analysis.hardware import System, load_catalog
from strata.analysis.operators import build_ops, distinct_experts, weight_bytes
from strata.analysis.placement import Scenario, plan_placement, step_cost
from strata.analysis.precision import Precisions
from strata.analysis.shapes import shape_from_dict


def llama(layers):
    return shape_from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
                              "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 4,
                              "vocab_size": 1000})


def moe():
    return shape_from_dict({"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 256,
                              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                              "num_key_value_heads": 4, "num_experts": 16, "num_experts_per_tok": 4,
                              "vocab_size": 1000})


def decode(shape, dev, prec, engine="generic"):
    sys = System(dev)
    sc = Scenario(batch=1, prompt=16, gen=2, prec=prec, engine=engine, offload="none")
    return step_cost(shape, sys, sc, plan_placement(shape, sys, sc, 0.0), 1, 1, 16)


def effs(**kw):
    return Efficiencies({"gpu": Eff(**{"eta_bw": 1.0, "eta_flops": 1.0, "overhead_us": 0.0, "eta_q": 1.0, "seq_us": 0.0,
                                       **kw})})


def test_overhead_is_per_kernel_call_and_scales_with_layers():
    dev = load_catalog()["rtx4090"]
    extra = []
    for layers in (2, 4):
        c = decode(llama(layers), dev, Precisions("bf16"))
        extra.append(c.time(effs(overhead_us=10.0)) - c.time(effs()))
        # per layer: 2 norms, q/k/v/o, attention, 3 FFN matrices; then embedding, final norm, lm_head
        assert sum(s.launches for s in c.segments) == 10 * layers + 3
    assert extra[1] - extra[0] == pytest.approx(20 * 10e-6, rel=1e-9)


def test_dequantizing_weights_stream_at_eta_q():
    dev = load_catalog()["rtx4090"]
    s = llama(2)
    for fmt, dequant in (("q4_0", True), ("bf16", False)):
        c = decode(s, dev, Precisions(fmt))
        slow, fast = c.time(effs(eta_q=0.5)), c.time(effs(eta_q=1.0))
        streamed = weight_bytes(s, Precisions(fmt))["total"] - s.vocab * s.hidden * 4.5 / 8  # not the embedding
        if dequant:  # batch-1 decode is bandwidth-bound: the streamed weights take exactly twice as long
            assert slow - fast == pytest.approx(streamed / dev.bw, rel=0.02)
        else:
            assert slow == fast


def test_calibrated_eta_q_below_one():
    e = Efficiencies.load()
    assert all(e.get(cls, "llama.cpp").eta_q < 1.0 for cls in ("gpu", "apple", "cpu-x86"))


def test_looped_experts_pay_one_call_per_matrix_per_expert():
    dev = load_catalog()["rtx4090"]
    looped = decode(moe(), dev, Precisions("bf16"), "transformers")
    fused = decode(moe(), dev, Precisions("bf16"), "vllm")
    calls = [sum(s.launches for s in c.segments) for c in (looped, fused)]
    assert calls[0] - calls[1] == pytest.approx(2 * (3 * 4 - 3))  # 2 layers, 4 experts x 3 matrices vs 3 calls


def _strata_step(new, **kw):
    s, sys = moe(), System(load_catalog()["strata-dev"])
    sc = Scenario(batch=1, prompt=16, gen=2, prec=Precisions("bf16"), engine="strata", **kw)
    return step_cost(s, sys, sc, plan_placement(s, sys, sc, 0.0), 1, new, 16).segments


def test_strata_runs_resident_decode_experts_in_one_native_call_and_loops_otherwise(monkeypatch):
    from strata.analysis import efficiency
    from strata.layers.moe import NATIVE_MAX_TOKENS

    monkeypatch.setattr(efficiency, "STRATA_LOOP_US", 0.0)  # the loop's calls priced as calls
    monkeypatch.setattr(efficiency, "STRATA_PREFILL_LOOP_US", 0.0)

    def calls(new, **kw):
        return sum(g.launches for g in _strata_step(new, **kw))

    fused = sum(g.launches for g in decode(moe(), load_catalog()["strata-dev"], Precisions("bf16"), "vllm").segments)
    assert calls(1, offload="none") == pytest.approx(fused - 2 * (3 - 1))  # moe_decode: 1 call per layer, not 3
    # an expert provider (offloaded experts, here all cached): the Python loop
    loop = calls(1, offload="experts", cache_frac=1.0, hit_rate=1.0)
    assert loop == pytest.approx(fused + 2 * (3 * 4 - 3))
    # a step of up to NATIVE_MAX_TOKENS tokens (a decode batch) still makes one expert call per layer
    non_expert = calls(NATIVE_MAX_TOKENS, offload="none") - 2
    assert non_expert == pytest.approx(calls(1, offload="none") - 2)
    # one token more: the Python loop, 3 calls per touched expert
    more = calls(NATIVE_MAX_TOKENS + 1, offload="none")
    assert more == pytest.approx(non_expert + 2 * 3 * distinct_experts(16, 4, NATIVE_MAX_TOKENS + 1))


def test_strata_native_batch_reads_each_touched_expert_once_through_its_gemv():
    from strata.analysis.efficiency import STRATA_GEMV_MAX_ROWS

    s, sys = moe(), System(replace(load_catalog()["strata-dev"], gemm_eff={16: 0.5}))
    sc = Scenario(batch=8, prompt=16, gen=2, prec=Precisions("int8wo", activations="bf16"), engine="strata",
                  offload="none")
    seg = step_cost(s, sys, sc, plan_placement(s, sys, sc, 0.0), 8, 1, 16).segments[0]
    i = seg.names.index("experts")
    assert 8 > STRATA_GEMV_MAX_ROWS and "experts.dequant" not in seg.names  # no expand pass: the blocks are read
    assert "q_proj.dequant" in seg.names  # attention's QuantLinear still expands its tiles for 8 rows
    expert = 3 * 256 * 128  # int8: one byte per weight
    assert seg.wbytes[i] == pytest.approx(distinct_experts(16, 4, 8) * expert)  # one layer's experts
    assert seg.rates[i] == 0  # the GEMV's rate by format, not the few-row matmul's


def test_distinct_experts_match_the_native_calls_expert_runs():
    """benchmarks/moe_batch_bytes.py counted the grouped kernel's expert runs per step on a 2-layer OLMoE: the
    expected distinct experts under uniform routing match them."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "moe_batch_bytes_olmoe.json"
    for r in json.loads(path.read_text())["rows"]:
        expected = r["moe_layers"] * distinct_experts(64, 8, r["seqs"])
        assert expected == pytest.approx(r["expert_runs_per_step"], rel=0.05)


def test_strata_python_expert_loop_costs_its_measured_time_per_call(monkeypatch):
    from strata.analysis import efficiency
    from strata.layers.moe import NATIVE_MAX_TOKENS

    monkeypatch.setattr(efficiency, "STRATA_LOOP_US", 0.0)
    plain = _strata_step(1, offload="experts", cache_frac=1.0, hit_rate=1.0)[0]
    monkeypatch.setattr(efficiency, "STRATA_LOOP_US", 50.0)
    looped = _strata_step(1, offload="experts", cache_frac=1.0, hit_rate=1.0)[0]
    expert_calls = 2 * 3 * 4  # 2 layers x 4 touched experts x 3 matrices
    assert looped.host_s == pytest.approx(expert_calls * 50e-6) and plain.host_s == 0
    assert plain.launches - looped.launches == pytest.approx(expert_calls)  # moved from calls to the loop's time
    assert _strata_step(1, offload="none")[0].host_s == 0  # the native call: no loop
    monkeypatch.setattr(efficiency, "STRATA_PREFILL_LOOP_US", 20.0)  # a prompt loops at its own measured cost
    assert _strata_step(4, offload="none")[0].host_s == 0  # a short prompt: one native call too
    new = NATIVE_MAX_TOKENS + 1
    prompt = _strata_step(new, offload="none")[0]
    touched = distinct_experts(16, 4, new)
    assert prompt.host_s == pytest.approx(2 * 3 * touched * 20e-6)


def test_strata_few_row_matmul_streams_weights_at_the_measured_rate():
    from dataclasses import replace

    s = llama(2)
    sc = Scenario(batch=1, prompt=16, gen=1, prec=Precisions("bf16"), engine="strata", offload="none")

    def mlp(eff, new):
        sys = System(replace(load_catalog()["strata-dev"], gemm_eff=eff))
        seg = step_cost(s, sys, sc, plan_placement(s, sys, sc, 0.0), 1, new, 0).segments[0]
        i = seg.names.index("mlp")
        unit = Efficiencies({"cpu-measured|strata": Eff(1.0, 1.0, 0.0, 1.0, 0.0)})
        return seg.op_times(unit)[1][i], seg, i

    half, seg, i = mlp({16: 0.5, 256: 0.1}, 16)
    w, bw = seg.wbytes[i], seg.dev.bw
    assert w > 0 and half == pytest.approx((seg.bytes[i] - w) / bw + w / (0.5 * bw))  # weights at half the bandwidth
    assert seg.dev.gemm_eff_at(64) == pytest.approx(0.5 * (0.1 / 0.5) ** 0.5)  # log-log between 16 and 256 rows
    assert mlp({16: 0.5}, 1)[0] == pytest.approx(mlp({}, 1)[0])  # one row: the GEMV, not the matmul rate


def test_strata_weights_use_the_probed_gemv_rate():
    dev = replace(load_catalog()["strata-dev"], kernel_eff={"int8wo": 0.5})
    s = llama(2)
    prec = Precisions("int8wo", head="bf16")
    strata = decode(s, dev, prec, "strata")
    e = Efficiencies({"cpu-measured|strata": Eff(1.0, 1.0, 0.0, 1.0), "cpu-measured": Eff(1.0, 1.0, 0.0, 1.0)})
    layer_bytes = weight_bytes(s, prec)["total"] - 2 * s.vocab * s.hidden * 2  # without embedding / lm_head
    other = decode(s, dev, prec, "generic")  # no measured rate: plain bandwidth (eta_q 1 here)
    assert strata.time(e) - other.time(e) == pytest.approx(layer_bytes / dev.bw, rel=0.02)


def test_engine_ratio_applies_on_every_class():
    e = Efficiencies({"gpu": Eff(0.8, 0.5, 2.0, 0.9), "*|old": Eff(0.5, 0.5, 2.0, 1.0)})
    got = e.get("gpu", "old")
    assert (got.eta_bw, got.eta_flops, got.overhead_us) == pytest.approx((0.4, 0.25, 4.0))
    assert e.get("gpu", "other") == e.table["gpu"]


def _host_decode(engine, sockets, new=1):
    s = moe()
    sys = System(load_catalog()["rtx4090"], host=replace(load_catalog()["xeon-6454s"], sockets=sockets))
    sc = Scenario(batch=1, prompt=16, gen=2, prec=Precisions("q4_k_m"), engine=engine, cpu_moe_layers=s.layers)
    return step_cost(s, sys, sc, plan_placement(s, sys, sc, 0.0), 1, new, 16)


def test_numa_unaware_engine_reads_at_one_sockets_bandwidth():
    e = Efficiencies({k: Eff(1.0, 1.0, 0.0, 1.0) for k in ("gpu", "cpu-server")})
    host = {eng: {n: _host_decode(eng, n).segments[1] for n in (1, 2)} for eng in ("llama.cpp", "ktransformers")}
    # the same summed bandwidth figure: NUMA-aware KTransformers reads at all of it, llama.cpp at half
    assert host["ktransformers"][2].time(e) == pytest.approx(host["ktransformers"][1].time(e))
    assert host["llama.cpp"][2].time(e) == pytest.approx(2 * host["llama.cpp"][1].time(e), rel=0.05)


def test_numa_aware_engine_keeps_a_copy_per_socket_only_where_the_copies_fit():
    e = Efficiencies({k: Eff(1.0, 1.0, 0.0, 1.0) for k in ("gpu", "cpu-server")})
    fits = _host_decode("ktransformers", 2).segments[1]
    assert fits.numa_local
    s = moe()
    experts = weight_bytes(s, Precisions("q4_k_m"))["experts"]
    # host memory for one copy and a half: the engine holds one, read through one socket's memory
    small = replace(load_catalog()["xeon-6454s"], sockets=2, memory_gb=1.5 * experts / 1e9 / 0.9)
    sys = System(load_catalog()["rtx4090"], host=small)
    sc = Scenario(batch=1, prompt=16, gen=2, prec=Precisions("q4_k_m"), engine="ktransformers",
                  cpu_moe_layers=s.layers)
    one = step_cost(s, sys, sc, plan_placement(s, sys, sc, 0.0), 1, 1, 16).segments[1]
    assert one.numa_local is False
    assert one.time(e) == pytest.approx(2 * fits.time(e), rel=0.05)


def test_llamacpp_copies_host_weights_to_the_gpu_for_big_batches():
    small, big = _host_decode("llama.cpp", 1, new=8), _host_decode("llama.cpp", 1, new=64)
    kt = _host_decode("ktransformers", 1, new=64)
    routed = sum(op for op, n in zip(big.segments[0].bytes, big.segments[0].names) if n.endswith(".copied"))
    assert small.segments[1].flops and not any(n.endswith(".copied") for n in small.segments[0].names)
    assert routed > 0 and not big.segments[1].flops and kt.segments[1].flops  # KTransformers computes on the CPU
    assert big.link_s > kt.link_s


def test_pageable_copies_are_staged_through_one_core():
    from strata.analysis.placement import STAGING_COPY_GBS

    big = _host_decode("llama.cpp", 1, new=64)
    copied = sum(op.weight_bytes for op in build_ops(moe(), Precisions("q4_k_m"), 1, 64, 16) if op.routed)
    link = load_catalog()["rtx4090"].link_gbs
    # staged copy: one core copies into the pinned buffer, then the link moves it, one after the other
    assert big.link_s == pytest.approx(copied * (1 / link + 1 / STAGING_COPY_GBS) * 1e-9)


def _prefill(dev_key, old_build, new=64, engine="llama.cpp", fmt="q4_0"):
    s, sys = llama(2), System(load_catalog()[dev_key])
    sc = Scenario(batch=1, prompt=new, gen=1, prec=Precisions(fmt), engine=engine, offload="none",
                  build_date=(2023, 12) if old_build else None)
    return step_cost(s, sys, sc, plan_placement(s, sys, sc, 0.0), 1, new, 0).segments[0]


def test_old_llamacpp_cuda_prefill_dequantizes_to_fp16_then_runs_fp16_gemm():
    new, old = _prefill("rtx4090", False), _prefill("rtx4090", True)
    i = old.names.index("q_proj.dequant")
    q = new.wbytes[new.names.index("q_proj")]  # Q4_0 bytes of q_proj (4.5 bits per weight)
    params = 256 * 256  # one layer's 256 x 256 projection
    assert q == pytest.approx(params * 4.5 / 8)
    # the expand kernel reads the blocks and writes fp16; the GEMM reads that fp16 copy at the fp16-accumulate peak
    assert old.bytes[i] == pytest.approx(q + 2 * params) and old.flops[i] == 0
    j = old.names.index("q_proj")
    assert old.peaks[j] == pytest.approx(330e12) and new.peaks[new.names.index("q_proj")] == pytest.approx(660e12)
    assert old.bytes[j] >= 2 * params
    e = effs()
    assert old.time(e) > new.time(e)
    # a handful of tokens (GEMV path) and GPUs without fp16 tensor cores (Pascal) keep the quantized kernels
    assert "q_proj.dequant" not in _prefill("rtx4090", True, new=8).names
    assert "q_proj.dequant" not in _prefill("tesla-p40", True).names


def test_strata_prefill_expands_quantized_tiles_in_cache_then_runs_a_bf16_gemm():
    from strata.analysis.efficiency import STRATA_GEMV_MAX_ROWS
    from strata.layers.quant_linear import GEMV_MAX_ROWS

    assert STRATA_GEMV_MAX_ROWS == GEMV_MAX_ROWS
    seg = _prefill("rtx4090", False, engine="strata", fmt="int8wo")
    i, j = seg.names.index("q_proj.dequant"), seg.names.index("q_proj")
    assert seg.bytes[i] == pytest.approx(256 * 256) and seg.wbytes[i] == seg.bytes[i]  # only the int8 read
    assert seg.wbytes[j] == 0 and seg.bytes[j] == pytest.approx(64 * (256 + 256) * 2)  # activations only: the bf16 tile stays in cache
    gemv = _prefill("rtx4090", False, engine="strata", fmt="int8wo", new=STRATA_GEMV_MAX_ROWS)
    assert "q_proj.dequant" not in gemv.names  # up to GEMV_MAX_ROWS rows the GEMV kernel reads the codes


def test_strata_expand_pass_runs_at_the_measured_rate_when_the_profile_has_one():
    from dataclasses import replace

    from strata.analysis.costmodel import Segment

    base = _prefill("strata-dev", False, engine="strata", fmt="int8wo")
    i = base.names.index("q_proj.dequant")
    assert base.seconds[i] == 0  # no measured rate: the pass is its quantized read alone
    s, dev = llama(2), replace(load_catalog()["strata-dev"], dequant_gelem_s={"int8wo": 2.0})
    sc = Scenario(batch=1, prompt=64, gen=1, prec=Precisions("int8wo"), engine="strata", offload="none")
    sys = System(dev)
    seg: Segment = step_cost(s, sys, sc, plan_placement(s, sys, sc, 0.0), 1, 64, 0).segments[0]
    assert seg.seconds[i] == pytest.approx(256 * 256 / 2e9)  # 65,536 int8 weights at 2 G weights/s
    f, b = seg.op_times(effs())
    assert f[i] == pytest.approx(256 * 256 / 2e9) and b[i] < f[i]  # compute-bound: slower than reading the codes
    assert seg.time(effs()) > base.time(effs())
    # other engines never take Strata's rate
    llama_cpp = step_cost(s, sys, replace(sc, engine="llama.cpp", prec=Precisions("q8_0")),
                          plan_placement(s, sys, sc, 0.0), 1, 64, 0).segments[0]
    assert not any(llama_cpp.seconds)


def test_strata_tile_outgrowing_the_last_level_cache_goes_through_memory():
    from dataclasses import replace

    s = llama(2)
    sc = Scenario(batch=1, prompt=64, gen=1, prec=Precisions("int8wo"), engine="strata", offload="none")

    def q_proj(llc_mb):
        sys = System(replace(load_catalog()["strata-dev"], llc_mb=llc_mb))
        seg = step_cost(s, sys, sc, plan_placement(s, sys, sc, 0.0), 1, 64, 0).segments[0]
        return seg, seg.names.index("q_proj.dequant"), seg.names.index("q_proj")

    tile = 256 * 256 * 2  # q_proj's bf16 tile: 128 KiB
    fits, i, j = q_proj(tile / 2**20 * 2)
    assert fits.bytes[i] == pytest.approx(256 * 256)  # only the int8 read: the tile stays in cache
    spills, i, j = q_proj(tile / 2**20 / 2)
    assert spills.bytes[i] == pytest.approx(256 * 256 + tile)  # the expand pass writes the bf16 tile to memory
    assert spills.bytes[j] - fits.bytes[j] == pytest.approx(tile)  # and the GEMM reads it back
    assert spills.launches == fits.launches  # expand and GEMM are one QuantLinear call


def test_strata_overhead_lives_in_strata_fit_json():
    import json

    from strata.analysis.efficiency import STRATA_FIT_PATH

    fitted = json.loads(STRATA_FIT_PATH.read_text())["overhead_us_per_call"]
    assert Efficiencies.load().get("cpu-measured", "strata").overhead_us == pytest.approx(fitted)


def test_engine_builds_are_dated_from_the_text_or_a_llamacpp_thread_number():
    from strata.analysis.efficiency import source_date, versioned_engine

    assert source_date("llama.cpp issue #34 (comment by slaren, 2023-08-12)") == (2023, 8)  # a stated date wins
    assert source_date("llama.cpp issue #4716 'Weird performance'") <= (2024, 4)  # opened before #6763
    assert (2024, 5) <= source_date("llama.cpp PR #7000") < (2024, 7)  # between the graphs and MMQ threads
    assert source_date("llama.cpp PR #9000") >= (2024, 7)
    # other repositories and long-running discussions say nothing about the build
    assert source_date("ikawrakow/ik_llama.cpp PR #128") is None
    assert source_date("llama.cpp GitHub discussion #4167") is None
    assert versioned_engine("llama.cpp (CPU)", source_date("llama.cpp issue #4716")) == "llama.cpp-2023"
    assert versioned_engine("llama.cpp (CUDA)", source_date("llama.cpp GitHub discussion #15013")) == "llama.cpp"


def test_host_time_per_sequence_bounds_big_batches_only():
    from strata.analysis.shapes import load_shape

    sys = System(load_catalog()["h100-sxm"])
    sc = Scenario(batch=1, prompt=16, gen=2, prec=Precisions("fp8"), offload="none")
    e0, e1 = effs(seq_us=0.0), effs(seq_us=30.0)
    big, tiny = load_shape("llama-3-8b"), llama(2)
    one = step_cost(big, sys, sc, plan_placement(big, sys, sc, 0.0), 1, 1, 16)
    assert one.time(e1) == pytest.approx(one.time(e0))  # 30 us hides behind one sequence's 8 GB step
    many = step_cost(tiny, sys, sc, plan_placement(tiny, sys, sc, 0.0), 4096, 1, 16)
    assert many.time(e0) < 4096 * 30e-6
    assert many.time(e1) == pytest.approx(4096 * 30e-6)  # a tiny model's big batch waits for the host loop


def test_pre_graphs_llamacpp_ratio_starts_from_its_measured_launch_overhead_and_keeps_its_family_ratio():
    from strata.analysis.calibrate import _prior
    from strata.analysis.efficiency import NEUTRAL, RATIO_PRIORS

    assert _prior("*|llama.cpp-2023").overhead_us == RATIO_PRIORS["*|llama.cpp-2023"].overhead_us > 1.0
    assert _prior("*|vllm") == NEUTRAL
    e = Efficiencies({"gpu": Eff(0.8, 0.5, 2.0, 0.9), "*|llama.cpp": Eff(1.0, 0.5, 1.0, 1.0, 1.0),
                      "*|llama.cpp-2023": Eff(1.0, 1.0, 4.0, 1.0, 1.0)})
    old = e.get("gpu", "llama.cpp-2023")
    assert (old.eta_flops, old.overhead_us) == pytest.approx((0.25, 8.0))  # the family's FLOPs ratio, its own overhead


def test_pre_graphs_llamacpp_overhead_applies_on_cuda_gpus_only():
    # CUDA graphs are a ggml-cuda feature: a llama.cpp build before them launches like a current one on Metal and CPUs
    table = {k: Eff(0.8, 0.5, 2.0, 0.9) for k in ("gpu", "apple", "cpu-arm")}
    e = Efficiencies({**table, "*|llama.cpp-2023": Eff(1.0, 1.0, 4.0, 1.0, 1.0)})
    assert e.get("gpu", "llama.cpp-2023").overhead_us == pytest.approx(8.0)
    assert e.get("apple", "llama.cpp-2023").overhead_us == pytest.approx(2.0)
    assert e.get("cpu-arm", "llama.cpp-2023") == e.get("cpu-arm", "llama.cpp")
