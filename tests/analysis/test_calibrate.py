"""`strata analyze --calibrate` reproduces the shipped calibration.json from the data in the repo, with fewer
fitted parameters than a fifth of the rows."""

import json

import pytest

from strata.analysis.calibrate import DATA_PATH, calibrate
from strata.analysis.efficiency import CALIBRATION_PATH


def test_calibration_json_is_reproduced_from_the_repo_data(tmp_path):
    shipped = json.loads(CALIBRATION_PATH.read_text())
    assert shipped["csv"] == DATA_PATH.name and DATA_PATH.exists()
    doc = calibrate(DATA_PATH, tmp_path / "calibration.json", held_out=False)
    assert doc["n_rows"] == shipped["n_rows"] and doc["n_parameters"] == shipped["n_parameters"]
    assert doc["n_parameters"] < doc["n_rows"] / 5
    assert doc["parameters"] == pytest.approx(shipped["parameters"], rel=1e-9)
    for key, factors in shipped["factors"].items():
        assert doc["factors"][key] == pytest.approx(factors, rel=1e-9), key
    assert doc["validation"]["fitted"] == pytest.approx(shipped["validation"]["fitted"], rel=1e-9)


def test_engines_on_vendor_gemm_libraries_share_one_flops_ratio():
    from strata.analysis.calibrate import CUBLAS, Param, parameters
    from strata.analysis.validate import load_cases

    params = parameters(load_cases(str(DATA_PATH)))
    assert Param("eta_flops", ("*|trt-llm", "*|fastertransformer", "*|vllm", f"*|{CUBLAS}")) in params
    assert Param("eta_flops", ("*|llama.cpp",)) in params
    shipped = json.loads(CALIBRATION_PATH.read_text())["factors"]
    assert shipped["*|trt-llm"] == shipped["*|fastertransformer"] == shipped["*|vllm"] == shipped[f"*|{CUBLAS}"]


def test_source_held_out_report_scores_each_source_unseen(tmp_path):
    from strata.analysis.calibrate import source_held_out_report

    lines = DATA_PATH.read_text().splitlines()
    small = tmp_path / "small.csv"
    small.write_text("\n".join(lines[:13]) + "\n")  # KTransformers, Fiddler, PowerInfer-2, Cambricon-LLM, llmfit rows
    rep = source_held_out_report(small, worst=3)
    loso = rep["leave_one_source_out"]
    assert loso["n_predicted"] == sum(m["n"] for m in rep["by_metric"].values())
    assert set(rep["by_metric"]) <= {"decode_tok_s", "prefill_tok_s"}
    errors = [abs(r["ratio"] - 1) for r in rep["worst"]]
    assert len(errors) == 3 and errors == sorted(errors, reverse=True)


def test_vendor_gemm_ratio_is_pulled_towards_the_measured_cublas_share():
    """The vendor-GEMM ratio's prior is cuBLAS FP8's measured share of an H100's peak (class factor x ratio), not
    the neutral ratio 1: held out, the source with the only large-batch vendor-GEMM rows (TensorRT-LLM's
    perf-overview) no longer takes the shared share down to the serving rows' ~0.37 of peak."""
    from strata.analysis.calibrate import _penalty, fit, parameters
    from strata.analysis.efficiency import SHARE_PRIORS, Eff, Efficiencies
    from strata.analysis.validate import load_cases

    cases = load_cases(str(DATA_PATH))
    vendor = next(p for p in parameters(cases) if p.is_ratio and p.keys[0] in SHARE_PRIORS)
    cls, share = SHARE_PRIORS[vendor.keys[0]]
    effs = Efficiencies({cls: Eff(0.8, 0.3, 5.0), vendor.keys[0]: Eff(1.0, share / 0.3, 1.0, 1.0, 1.0)})
    assert _penalty(effs, vendor) == pytest.approx(0.0, abs=1e-12)
    effs.set(vendor.keys[0], Eff(1.0, 1.0, 1.0, 1.0, 1.0))
    assert _penalty(effs, vendor) > 0.5 * 0.7  # 0.5 x |log(0.3 / 0.655)|

    held = fit([c for c in cases if not c.reason and "perf-overview.md" not in c.row["source"]])
    assert held.table[cls].eta_flops * held.table[vendor.keys[0]].eta_flops > 0.45
