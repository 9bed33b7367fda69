"""`strata bench serve` against a live `strata serve`: every request streams to the end and is counted, and a bad
endpoint's answers are counted as failures with their status, not raised."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.server.conftest import REPO


def _bench(server, tmp_path, *flags: str) -> dict:
    out = tmp_path / "result.jsonl"
    r = subprocess.run([sys.executable, "-m", "strata", "bench", "serve", "--base-url", server.url, "--dataset",
                        "random", "--num-prompts", "6", "--input-len", "8", "--output-len", "12",
                        "--result-json", str(out), *flags], cwd=REPO, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text().splitlines()[-1])


def test_bench_serve_counts_every_streamed_token(server, tmp_path):
    s = _bench(server, tmp_path, "--request-rate", "inf")
    assert s["completed"] == 6 and s["failed"] == 0, s["errors"]
    assert s["total_output_tokens"] == 6 * 12  # usage chunks: ignore_eos makes every request run to its length
    assert s["total_input_tokens"] >= 6 * 8
    assert 0 < s["p50_ttft_ms"] <= s["p50_e2el_ms"] and s["mean_itl_ms"] > 0
    assert s["config"]["model"] == "tiny"  # taken from /v1/models


def test_bench_serve_counts_http_errors_as_failures(server, tmp_path):
    s = _bench(server, tmp_path, "--endpoint", "/v1/no-such-endpoint", "--num-prompts", "2")
    assert s["completed"] == 0 and s["failed"] == 2
    assert s["errors"] and s["errors"][0].startswith("HTTP 404")
