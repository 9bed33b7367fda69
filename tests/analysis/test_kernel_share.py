"""Dated kernel generations of the llama.cpp family's CPU prompt matmuls (placement.kernel_share): a build before
the tiled Q4_0 / Q8_0 kernel, mainline K-quants, and iqk kernels (llamafile from 0.8.4 / 0.8.5, ik_llama.cpp)."""

import json

import pytest

from strata.analysis.efficiency import LLAMACPP_CPU_SHARE, LLAMACPP_PRE_SGEMM_SHARE, Eff, Efficiencies
from strata.analysis.hardware import System, load_catalog
from strata.analysis.placement import Scenario, plan_placement, step_cost
from strata.analysis.precision import Precisions
from strata.analysis.shapes import shape_from_dict


def llama():
    return shape_from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 1024, "intermediate_size": 4096,
                            "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 8,
                            "vocab_size": 1000})


def moe():
    return shape_from_dict({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 1024,
                            "intermediate_size": 2048, "num_hidden_layers": 2, "num_attention_heads": 8,
                            "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
                            "vocab_size": 1000})


def mlp_peak(fmt, device="ryzen-7950x", new=512, shape=None, op="mlp", **kw):
    """Peak FLOP/s the cost model gives the FFN matmul of a prompt step."""
    s = shape or llama()
    sys = System(load_catalog()[device])
    sc = Scenario(batch=1, prompt=new, gen=1, prec=Precisions(fmt), engine=kw.pop("engine", "llama.cpp"),
                  offload="none", **kw)
    seg = step_cost(s, sys, sc, plan_placement(s, sys, sc, 0.0), 1, new, 0).segments[0]
    return seg.peaks[seg.names.index(op)], seg


def test_builds_before_the_tiled_cpu_matmul_run_q4_0_prompts_at_the_stated_share():
    # Zen 3 has no VNNI (its catalog int8 peak is AVX2's): only the kernel generation differs between the builds
    new, _ = mlp_peak("q4_0", device="ryzen-5950x", build_date=(2024, 6))
    old, seg = mlp_peak("q4_0", device="ryzen-5950x", build_date=(2023, 8))
    assert old == pytest.approx(new * LLAMACPP_PRE_SGEMM_SHARE)
    assert mlp_peak("q4_0", device="ryzen-5950x", build_date=None)[0] == new  # undated: today's kernels
    assert mlp_peak("q4_0", build_date=(2023, 8), new=1)[0] == mlp_peak("q4_0", new=1)[0]  # decode: the same GEMV
    # slower kernels, slower prompt: the step takes longer under the same factors
    e = Efficiencies({"cpu-x86": Eff(0.6, 0.3, 3.0)})
    assert seg.time(e) > mlp_peak("q4_0", build_date=(2024, 6))[1].time(e)


def test_k_quants_run_at_mainlines_share_and_faster_under_iqk_kernels():
    q4 = mlp_peak("q4_0")[0]
    assert mlp_peak("q6_k")[0] == pytest.approx(q4 * LLAMACPP_CPU_SHARE["mainline"]["kquant"])
    assert mlp_peak("q5_0")[0] == pytest.approx(q4 * LLAMACPP_CPU_SHARE["mainline"]["legacy"])
    iqk = q4 * LLAMACPP_CPU_SHARE["iqk"]["kquant"]
    assert mlp_peak("q6_k", engine_name="ik_llama.cpp")[0] == pytest.approx(iqk)
    assert mlp_peak("q6_k", engine_name="llamafile", engine_version="0.8.6")[0] == pytest.approx(iqk)
    assert mlp_peak("q6_k", engine_name="llamafile")[0] == pytest.approx(iqk)  # version not stated: a current one
    assert mlp_peak("q6_k", engine_name="llamafile", engine_version="0.8.3")[0] == pytest.approx(
        q4 * LLAMACPP_CPU_SHARE["mainline"]["kquant"])
    assert mlp_peak("q4_0", engine_name="ik_llama.cpp")[0] == q4  # Q4_0: the tiled kernel either way


def test_llamafile_kernels_for_moe_layers_came_one_release_later():
    kw = {"shape": moe(), "op": "experts", "engine_name": "llamafile"}
    q4 = mlp_peak("q4_0", **kw)[0]
    assert mlp_peak("q6_k", engine_version="0.8.4", **kw)[0] == pytest.approx(
        q4 * LLAMACPP_CPU_SHARE["mainline"]["kquant"])
    assert mlp_peak("q6_k", engine_version="0.8.5", **kw)[0] == pytest.approx(q4 * LLAMACPP_CPU_SHARE["iqk"]["kquant"])


def test_gpus_and_other_engines_keep_the_class_rate():
    assert mlp_peak("q6_k", device="rtx4090")[0] == mlp_peak("q4_0", device="rtx4090")[0]
    assert mlp_peak("q6_k", engine="vllm")[0] == mlp_peak("q4_0", engine="vllm")[0]


def test_k_quant_tables_are_x86_only_while_the_tiled_kernel_date_holds_everywhere():
    arm = "raspberry-pi-5"
    assert mlp_peak("q6_k", device=arm)[0] == mlp_peak("q4_0", device=arm)[0]
    assert mlp_peak("q4_0", device=arm, build_date=(2023, 8))[0] == pytest.approx(
        mlp_peak("q4_0", device=arm)[0] * LLAMACPP_PRE_SGEMM_SHARE)


def test_analyze_names_the_engine_whose_kernels_it_prices(capsys):
    from strata.cli import main

    def prefill(engine):
        assert main(["analyze", "--model", "llama-2-7b", "--hardware", "ryzen-7950x", "--engine", engine,
                     "--weights", "q6_k", "--prompt", "512", "--json"]) == 0
        return json.loads(capsys.readouterr().out)["prefill_tok_s"]

    mainline, iqk = prefill("llama.cpp"), prefill("llamafile 0.8.6")
    ratio = LLAMACPP_CPU_SHARE["iqk"]["kquant"] / LLAMACPP_CPU_SHARE["mainline"]["kquant"]
    assert 1.3 < iqk / mainline <= ratio * 1.001  # compute-bound prompt: close to the kernels' ratio


def test_engine_versions_as_written():
    from strata.analysis.placement import _version

    assert _version("0.8.6") == (0, 8, 6) and _version("0.9.0rc1") == (0, 9, 0, 1)
    assert _version("b6000") is None and _version(None) is None


def test_llamacpp_fp16_prompt_gemms_run_in_cublas_at_the_fp16_accumulate_peak_and_cublas_share():
    from strata.analysis.efficiency import CUBLAS

    peak, seg = mlp_peak("fp16", device="rtx4090")
    assert peak == pytest.approx(330e12)  # GeForce: fp16 accumulate runs at twice the fp32-accumulate rate
    assert seg.libraries[seg.names.index("mlp")] == CUBLAS
    assert mlp_peak("fp16", device="rtx4090", engine="vllm")[0] == pytest.approx(165e12)  # PyTorch: fp32 accumulate
    assert mlp_peak("fp16", device="rtx4090", new=8)[1].libraries == [""] * len(seg.names)  # few tokens: own kernels
    assert mlp_peak("q4_0", device="rtx4090")[1].libraries == [""] * len(seg.names)  # MMQ reads the blocks itself
    # the cuBLAS GEMM is priced at the vendor-GEMM share, the rest of the step at llama.cpp's
    e = Efficiencies({"gpu": Eff(1.0, 0.3, 0.0, 1.0, 0.0), "*|llama.cpp": Eff(1.0, 0.5, 1.0, 1.0, 1.0),
                      f"*|{CUBLAS}": Eff(1.0, 2.0, 1.0, 1.0, 1.0)})
    compute, _ = seg.op_times(e)
    i = seg.names.index("mlp")
    assert compute[i] == pytest.approx(seg.flops[i] / (330e12 * 0.6))
    j = seg.names.index("attention")
    assert compute[j] == pytest.approx(seg.flops[j] / (seg.peaks[j] * 0.15))


def test_llamacpp_prompt_attention_before_flash_attention_writes_fp32_scores_per_ubatch():
    from strata.analysis.efficiency import LLAMACPP_FLASH_ATTN, LLAMACPP_UBATCH

    s = llama()
    new = 2 * LLAMACPP_UBATCH
    old = mlp_peak("q4_0", device="rtx4090", new=new, build_date=(2024, 5))[1]
    cur = mlp_peak("q4_0", device="rtx4090", new=new, build_date=LLAMACPP_FLASH_ATTN)[1]
    i = old.names.index("attention")
    # two ubatches: the first attends to 512 keys, the second to all 1024; every score is a 4-byte float written,
    # read and written by the softmax, and read by the V product
    scores = s.heads * LLAMACPP_UBATCH * (LLAMACPP_UBATCH + new)
    assert old.flops[i] == pytest.approx(2.0 * scores * 2 * s.head_dim)
    assert old.bytes[i] - cur.bytes[i] == pytest.approx(16.0 * scores)
    assert cur.flops[i] < old.flops[i]  # flash attention skips the masked half
    assert mlp_peak("q4_0", device="rtx4090", new=new)[1].bytes[i] == cur.bytes[i]  # undated: a current build


def test_builds_before_vnni_run_x86_int8_prompts_at_twice_the_fp32_rate():
    cpu = load_catalog()["i9-13900k"]  # AVX-VNNI part: the catalog's int8 peak is 4x its fp32 one
    old, _ = mlp_peak("q4_0", device="i9-13900k", build_date=(2023, 8))
    assert old == pytest.approx(2.0 * cpu.peak("fp32") * LLAMACPP_PRE_SGEMM_SHARE * cpu.even_split_share())
    assert mlp_peak("q4_0", device="i9-13900k", build_date=(2024, 6))[0] == pytest.approx(cpu.peak("int8"))
    assert mlp_peak("q4_0", device="i9-13900k")[0] == pytest.approx(cpu.peak("int8"))  # undated: a current build


def test_builds_before_dynamic_scheduling_wait_for_the_slowest_thread_of_a_hybrid_cpu():
    """Before llama.cpp PR #6915 each of an i9-13900K's 32 threads got 1/32 of a matmul's rows: the 16 E-core threads
    (4.3 GHz x 16 FLOPs/cycle) finish last, so the prompt runs at 32 x 68.8 GFLOP/s of the 2508.8 peak."""
    cpu = load_catalog()["i9-13900k"]
    assert cpu.even_split_share() == pytest.approx(32 * 4.3 * 16 / (8 * 5.5 * 32 + 16 * 4.3 * 16))
    # the same month, the same kernels otherwise: only the scheduling differs between April 2024 and May 2024 builds
    before = mlp_peak("q4_0", device="i9-13900k", build_date=(2024, 4))[0]
    after = mlp_peak("q4_0", device="i9-13900k", build_date=(2024, 5))[0]
    assert before == pytest.approx(after * cpu.even_split_share())
    uniform = load_catalog()["ryzen-7950x"]  # one core type: an even split is already balanced
    assert uniform.even_split_share() == 1.0
    assert mlp_peak("q4_0", build_date=(2024, 4))[0] == mlp_peak("q4_0", build_date=(2024, 5))[0]
