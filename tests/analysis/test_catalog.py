"""Hardware catalog loads; every entry has a source; lookups and monotonicity of the cost model."""

from dataclasses import replace

import pytest

from strata.analysis.efficiency import Efficiencies
from strata.analysis.hardware import load_catalog, match_device, parse_system
from strata.analysis.placement import Scenario
from strata.analysis.precision import Precisions
from strata.analysis.predict import predict
from strata.analysis.shapes import load_shape
from strata.errors import ConfigError


def test_every_entry_has_a_source_and_figures():
    cat = load_catalog()
    assert len(cat) >= 30
    for key, d in cat.items():
        assert d.source, key
        if d.cls != "storage":
            assert d.bandwidth_gbs > 0 and d.peak_tflops, key
    classes = {d.cls for d in cat.values()}
    assert {"gpu", "apple", "cpu-x86", "cpu-server", "cpu-arm", "design"} <= classes
    for k in ("h100-sxm", "h200", "l40s", "rtx3090", "rtx4090", "rtx5090", "rtx-a5000", "rtx-a6000",
              "jetson-agx-orin", "raspberry-pi-5", "rk3588", "snapdragon-8-gen-3", "cambricon-llm",
              "sambanova-sn40l", "pim-gpt", "sail-cpu"):
        assert k in cat


def test_match_free_text():
    assert match_device("NVIDIA GeForce RTX 4090 24GB") == "rtx4090"
    assert match_device("NVIDIA H100 PCIe 80GB") == "h100-pcie"
    assert match_device("Apple M2 Ultra (76-core GPU)") == "apple-m2-ultra"
    sys = parse_system("rtx4090+2x xeon-6454s")
    assert sys.host.bandwidth_gbs == pytest.approx(2 * 307.2)
    with pytest.raises(ConfigError):
        parse_system("nonexistent-gpu-9000")


@pytest.mark.parametrize("model,hw,fmt", [("llama-2-7b", "rtx4090", "q4_0"), ("mixtral-8x7b", "rtx4090+xeon-6454s", "bf16"),
                                          ("qwen3-30b-a3b", "strata-dev", "int8")])
def test_more_bandwidth_is_never_slower(model, hw, fmt):
    s, effs = load_shape(model), Efficiencies()
    sys = parse_system(hw)
    sc = Scenario(prompt=256, gen=64, prec=Precisions(fmt))
    base = predict(s, sys, sc, effs)
    faster = replace(sys, device=replace(sys.device, bandwidth_gbs=sys.device.bandwidth_gbs * 2))
    if sys.host is not None:
        faster = replace(faster, host=replace(sys.host, bandwidth_gbs=sys.host.bandwidth_gbs * 2))
    better = predict(s, faster, sc, effs)
    assert better.tpot_s <= base.tpot_s and better.ttft_s <= base.ttft_s
    more_flops = replace(sys, device=replace(sys.device, peak_tflops={k: v * 2 for k, v in sys.device.peak_tflops.items()}))
    assert predict(s, more_flops, sc, effs).ttft_s <= base.ttft_s


def test_batching_raises_throughput_and_offload_costs_time():
    s, effs = load_shape("llama-3-8b"), Efficiencies()
    sys = parse_system("h100-sxm")
    one = predict(s, sys, Scenario(batch=1, prec=Precisions("bf16")), effs)
    many = predict(s, sys, Scenario(batch=32, prec=Precisions("bf16")), effs)
    assert many.batch / many.tpot_s > 10 * one.batch / one.tpot_s
    mx = load_shape("mixtral-8x7b")
    hybrid = parse_system("rtx4090+xeon-6454s")
    hot = predict(mx, hybrid, Scenario(prec=Precisions("q4_k_m"), offload="experts", hit_rate=0.9, cache_frac=0.9), effs)
    cold = predict(mx, hybrid, Scenario(prec=Precisions("q4_k_m"), offload="experts", hit_rate=0.2, cache_frac=0.2), effs)
    assert cold.tpot_s > hot.tpot_s


def test_probe_profile_kernel_figures_map_to_weight_formats():
    from strata.analysis.hardware import device_from_dict

    prof = {"name": "probe", "class": "cpu-measured", "peak_tflops": {"fp16": 1.0}, "memory_gb": 16, "bandwidth_gbs": 20,
            "kernels": {"gemv_strata_int8_gbs": 10.0, "gemv_strata_bf16_gbs": 30.0, "dequant_strata_int8_gelem_s": 5.0,
                        "dequant_strata_fp8_gelem_s": 4.0, "gemm_bf16_tflops": 1.0}}
    dev = device_from_dict("probe", prof)
    assert dev.kernel_eff == {"int8wo": 0.5, "bf16": 1.0}  # GB/s over the probed bandwidth, capped at 1
    assert dev.dequant_gelem_s == {"int8wo": 5.0, "fp8wo": 4.0}


def test_geforce_blackwell_peaks_are_dense_fractions_of_the_sparse_fp4_ai_tops():
    # NVIDIA quotes GeForce RTX 50 "AI TOPS" as sparse fp4: dense fp4 is half of it, int8 a quarter
    cat = load_catalog()
    assert cat["rtx5090"].peak_tflops["fp4"] == pytest.approx(3352 / 2)
    assert cat["rtx5090"].peak_tflops["int8"] == pytest.approx(3352 / 4)
    for key in ("rtx5060", "rtx5060ti", "rtx5070", "rtx5070ti", "rtx5080", "rtx5090"):
        peaks = cat[key].peak_tflops
        assert peaks["fp4"] == pytest.approx(2 * peaks["int8"], rel=1e-3), key
        assert peaks["fp16_acc16"] == pytest.approx(2 * peaks["fp16"], abs=0.2), key  # figures rounded to 0.1


def test_apple_cpu_cores_draw_their_share_of_the_soc_bandwidth_whatever_the_row_states():
    from strata.analysis.validate import _system

    cpu = load_catalog()["apple-m3-max-cpu"]
    assert cpu.bandwidth_gbs == 400 and cpu.bw == pytest.approx(0.59 * 400e9)  # AnandTech: 243 of 409.6 GB/s (M1 Max)
    row = {"hardware": "Apple M3 Max (40-core GPU) 48GB, CPU backend", "hardware_mem_bw_gbs": "400", "notes": "",
           "system": "llama.cpp (CPU only)"}
    assert _system(row).device.bw == pytest.approx(cpu.bw)  # the stated SoC figure replaces the memory, not the share
    assert load_catalog()["apple-m3-max"].bw == pytest.approx(400e9)
