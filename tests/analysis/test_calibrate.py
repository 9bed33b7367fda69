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
