"""`strata analyze --validate` on a tiny CSV with a known answer, and the analyze / probe / plan commands."""

import csv
import json

import pytest

from strata.analysis.efficiency import Efficiencies
from strata.analysis.hardware import load_catalog
from strata.analysis.operators import weight_bytes
from strata.analysis.precision import Precisions
from strata.analysis.shapes import load_shape
from strata.analysis.trace import hit_rate
from strata.analysis.validate import load_cases, score
from strata.cli import main

COLUMNS = ["source", "system", "model", "params_total_b", "params_active_b", "dtype_or_quant", "hardware",
           "hardware_mem_bw_gbs", "batch", "prompt_tokens", "gen_tokens", "metric", "value", "offload", "notes"]


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})


def ideal_calibration(path):
    # full bandwidth, no dequantization loss, no overhead: batch-1 decode time is then bytes / bandwidth
    doc = {"factors": {"gpu": {"eta_bw": 1.0, "eta_flops": 1.0, "overhead_us": 0.0, "eta_q": 1.0}}}
    path.write_text(json.dumps(doc))
    return str(path)


def test_validate_known_answer(tmp_path, capsys):
    s = load_shape("llama-2-7b")
    bw = load_catalog()["rtx4090"].bandwidth_gbs * 1e9
    expected = bw / weight_bytes(s, Precisions("q4_0"))["total"]  # weights dominate batch-1 decode
    rows = [
        {"source": "t", "system": "llama.cpp", "model": "meta-llama/Llama-2-7b-hf", "dtype_or_quant": "Q4_0",
         "hardware": "NVIDIA GeForce RTX 4090 24GB", "batch": "1", "prompt_tokens": "0", "gen_tokens": "16",
         "metric": "decode_tok_s", "value": f"{expected:.3f}"},
        {"source": "t", "system": "llama.cpp", "model": "meta-llama/Llama-2-7b-hf", "dtype_or_quant": "Q4_0",
         "hardware": "NVIDIA GeForce RTX 4090 24GB", "batch": "1", "prompt_tokens": "0", "gen_tokens": "16",
         "metric": "decode_tok_s", "value": f"{expected / 2:.3f}"},
        {"source": "t", "system": "x", "model": "unknown/Model-1B", "dtype_or_quant": "F16",
         "hardware": "NVIDIA GeForce RTX 4090 24GB", "batch": "1", "metric": "decode_tok_s", "value": "10"},
    ]
    csv_path = tmp_path / "m.csv"
    write_csv(csv_path, rows)
    cal = ideal_calibration(tmp_path / "cal.json")
    res = score(load_cases(str(csv_path)), Efficiencies.load(cal))
    assert res["n_predicted"] == 2 and res["n_unpredictable"] == 1
    first, second = res["rows"]
    assert first["ape"] < 0.02  # activations, norms and the small KV cache are the only extra bytes
    assert second["ratio"] == pytest.approx(2 * first["ratio"], rel=1e-6)
    assert res["gmean_ratio"] == pytest.approx((first["ratio"] * second["ratio"]) ** 0.5, rel=1e-9)
    assert "no preset" in res["unpredictable"][0]["reason"]
    assert main(["analyze", "--validate", str(csv_path), "--json", "--calibration", cal]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"median_ape", "p90_ape", "gmean_ratio", "rows"} <= set(out)
    assert out["median_ape"] == pytest.approx(res["median_ape"])


def test_max_throughput_rows_use_the_kv_limited_batch_capped_by_the_benchmark(tmp_path):
    row = {"source": "t", "model": "meta-llama/Llama-2-7b-hf", "dtype_or_quant": "FP8", "hardware": "NVIDIA H200",
           "batch": "max (offline, CUDA graphs up to 8192)", "prompt_tokens": "4", "gen_tokens": "4",
           "metric": "throughput_tok_s", "value": "1000"}
    write_csv(tmp_path / "m.csv", [{**row, "system": "TensorRT-LLM"}, {**row, "system": "vLLM"},
                                   {**row, "system": "vLLM", "prompt_tokens": "4000", "gen_tokens": "4000"}])
    trt, vllm, long = load_cases(str(tmp_path / "m.csv"))
    assert trt.batch == 4096  # trtllm-bench tunes for at most 4096 sequences
    assert vllm.batch == 8192  # the row's own cap; the KV cache would hold more 8-token sequences
    assert 1 < long.batch < 4096  # long sequences: the KV cache is the limit


def test_analyze_outputs(tmp_path, capsys):
    png = tmp_path / "roof.png"
    assert main(["analyze", "--model", "deepseek-v2-lite", "--hardware", "rtx4090", "--weights", "int4",
                 "--plot", str(png), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tpot_ms"] > 0 and out["memory_gb"]["kv_cache"] > 0 and png.stat().st_size > 1000
    assert {r["op"] for r in out["decode_ops"]} >= {"kv_a_proj", "kv_b_proj", "experts", "shared_expert"}
    cfg = tmp_path / "m"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                                 "intermediate_size": 128, "num_hidden_layers": 2,
                                                 "num_attention_heads": 4, "vocab_size": 100}))
    assert main(["analyze", "--model", str(cfg), "--sweep-batch", "1,8", "--sweep-context", "16,64"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 6
    assert main(["analyze", "--model", "no-such-model"]) == 2


def test_routing_trace_hit_rates(tmp_path):
    trace = [(0, [0, 1], [0.5, 0.5]), (0, [0, 2], [0.9, 0.1]), (0, [0, 1], [0.6, 0.4])]
    # LRU with 2 slots: miss 0, miss 1, hit 0, miss 2 (evicts 1), hit 0, miss 1 -> 2 hits of 6
    assert hit_rate(trace, 2, "lru") == pytest.approx(2 / 6)
    assert hit_rate(trace, 3, "lru") == pytest.approx(3 / 6)
    assert hit_rate(trace, 0, "lfu") == 0.0


def test_probe_quick_and_plan(tmp_path, capsys):
    from strata.analysis.hardware import parse_system

    prof = tmp_path / "hw.json"
    assert main(["probe", "--quick", "--out", str(prof), "--dir", str(tmp_path)]) == 0
    d = json.loads(prof.read_text())
    assert d["bandwidth_gbs"] > 0 and d["peak_tflops"]["fp16"] > 0 and d["class"] == "cpu-measured"
    dev = parse_system(str(prof)).device
    assert dev.llc_mb == d["llc_mb"] >= 0  # sysfs cache size where Linux has it
    assert set(dev.gemm_eff) == {16} and 0 < dev.gemm_eff[16] <= 1  # quick mode: M = 16 is also its GEMM row count
    assert set(dev.kernel_eff) == {"bf16", "int8wo", "int4-g64", "fp8wo"}
    assert set(dev.dequant_gelem_s) <= {"int8wo", "int4-g64", "fp8wo"} and all(v > 0 for v in dev.dequant_gelem_s.values())
    # Strata's own host costs measured on this machine travel with the profile into the device
    assert set(dev.strata_host) == {"overhead_us_per_call", "loop_us_per_expert_call", "prefill_loop_us_per_expert_call"}
    assert all(v >= 0 for v in dev.strata_host.values()) and d["strata_host"]["dense_step_ms"] > 0
    capsys.readouterr()
    runs = tmp_path / "runs.jsonl"
    runs.write_text("")
    assert main(["plan", "--model", "olmoe", "--memory-budget", "4G", "--profile", str(prof), "--runs", str(runs),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    best = out["best"]
    assert best["fits"] and best["predicted_tok_s"] > 0
    assert {c["precision"] for c in out["candidates"]} <= {"bf16", "int8", "int4"}
    # a measured run for the best config replaces its prediction and scales the others
    cfg = {k: best[k] for k in ("precision", "cache_experts", "policy", "prefetch", "threads")}
    runs.write_text(json.dumps({"model": "olmoe", "config": cfg, "tokens_per_s": best["predicted_tok_s"] / 2}) + "\n")
    assert main(["plan", "--model", "olmoe", "--memory-budget", "4G", "--profile", str(prof), "--runs", str(runs),
                 "--json"]) == 0
    out2 = json.loads(capsys.readouterr().out)
    assert all(c["corrected_tok_s"] == pytest.approx(c["predicted_tok_s"] / 2, rel=1e-6)
               for c in out2["candidates"])


def test_coverage_engine_defaults_and_flags(tmp_path, capsys):
    base = {"source": "t", "model": "meta-llama/Llama-3.2-3B-Instruct", "hardware": "Raspberry Pi 5 16GB",
            "batch": "1", "prompt_tokens": "0", "gen_tokens": "16", "metric": "decode_tok_s", "value": "5"}
    rows = [{**base, "system": "Ollama", "dtype_or_quant": "Ollama default quant"},
            {**base, "system": "Ollama", "dtype_or_quant": "Q4_K_M"},
            {**base, "system": "SuperEngine 2", "dtype_or_quant": "Q4_K_M"},
            {**base, "system": "llama.cpp", "dtype_or_quant": "not stated"},
            {**base, "system": "llama.cpp", "dtype_or_quant": "Q4_K_M", "hardware": "Abacus Mark II"}]
    write_csv(tmp_path / "m.csv", rows)
    res = score(load_cases(str(tmp_path / "m.csv")), Efficiencies())
    assert res["coverage"] == pytest.approx(4 / 5) and res["n_unpredictable"] == 1
    default, stated, unknown, assumed = res["rows"]
    assert default["predicted"] == pytest.approx(stated["predicted"])  # Ollama's default is Q4_K_M
    assert any("Ollama library" in n for n in default["notes"]) and not stated["flags"]
    assert unknown["flags"] == ["physics-only (unknown engine)"]
    assert assumed["flags"] == ["assumed quantization"] and assumed["predicted"] < stated["predicted"]  # bf16
    assert main(["analyze", "--validate", str(tmp_path / "m.csv"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["coverage"] == pytest.approx(0.8) and {"median_ape", "p90_ape", "gmean_ratio"} <= set(out)
    assert "not in the catalog" in out["unpredictable"][0]["reason"]


def test_a_gpu_too_small_for_the_model_gets_an_assumed_host(tmp_path):
    row = {"source": "t", "system": "llama.cpp", "dtype_or_quant": "Q4_K_M", "hardware": "NVIDIA GeForce RTX 3070",
           "batch": "1", "prompt_tokens": "0", "gen_tokens": "16", "metric": "decode_tok_s", "value": "1"}
    write_csv(tmp_path / "m.csv", [{**row, "model": "meta-llama/Llama-2-70b-hf"},
                                   {**row, "model": "meta-llama/Llama-2-7b-hf"}])
    big, small = score(load_cases(str(tmp_path / "m.csv")), Efficiencies())["rows"]
    assert big["flags"] == ["assumed host"] and any("do not fit 8 GB" in n for n in big["notes"])
    assert not small["flags"]  # 3.9 GB of Q4_K_M fits the 8 GB card
    host_bw = load_catalog()["desktop-host-ddr4"].bandwidth_gbs * 1e9
    # most of the 70B layers run on the host CPU: no faster than its memory can stream them
    assert big["predicted"] < host_bw / (weight_bytes(load_shape("llama-2-70b"), Precisions("q4_k_m"))["total"] * 0.7)
