"""lm-evaluation-harness's `local-completions` against `strata serve` gives the loglikelihoods and accuracy of
lm-eval's own `hf` backend on the same model and items (slow: `pytest -m slow tests/server/test_lm_eval.py`)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")


@pytest.mark.slow
def test_lm_eval_local_completions_matches_hf_backend():
    from benchmarks.lm_eval_local import run
    from strata.engine.llm_engine import BUNDLED_MODEL

    r = run(os.environ.get("STRATA_LM_EVAL_MODEL", BUNDLED_MODEL))
    assert r["num_loglikelihoods"] == 160  # 40 items x 4 choices, every one scored over HTTP
    assert r["max_abs_loglikelihood_diff"] < 1e-3
    assert r["acc_strata"] == r["acc_hf"]
