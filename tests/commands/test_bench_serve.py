"""`strata bench serve` request loading works from the package alone: the Azure lengths ship with it, and
ShareGPT prompts without --dataset-path give one line naming the flag."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from strata.commands import bench_serve
from strata.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _args(**kw) -> argparse.Namespace:
    base = {"num_prompts": 5, "dataset": "sharegpt", "dataset_path": None, "input_len": 8, "output_len": 4,
            "max_input_len": 64, "max_output_len": 32, "max_prompt_chars": 200, "seed": 0}
    return argparse.Namespace(**{**base, **kw})


def test_shipped_lengths_are_the_azure_conversation_trace():
    lengths = bench_serve._azure()
    assert len(lengths) == 19366 and all(i > 0 and o > 0 for i, o in lengths[:100])
    reqs = bench_serve.load_requests(_args(dataset="azure"), random.Random(0))
    assert len(reqs) == 5 and all(1 <= r.max_tokens <= 32 for r in reqs)


def test_sharegpt_from_a_given_file_and_without_one(tmp_path):
    with pytest.raises(ConfigError, match="--dataset-path"):
        bench_serve.load_requests(_args(), random.Random(0))
    data = tmp_path / "prompts.json"
    data.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"prompt {i}"}]} for i in range(3)]))
    reqs = bench_serve.load_requests(_args(dataset_path=str(data)), random.Random(0))
    assert {r.prompt for r in reqs} == {"prompt 0", "prompt 1", "prompt 2"}
    data.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ConfigError, match="ShareGPT JSON"):
        bench_serve.load_requests(_args(dataset_path=str(data)), random.Random(0))


def test_missing_dataset_path_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "strata", "bench", "serve", "--dataset-path", str(tmp_path / "x.json"),
                        "--base-url", "http://127.0.0.1:9"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --dataset-path")


def test_unreachable_server_exits_2_with_one_line():
    r = subprocess.run([sys.executable, "-m", "strata", "bench", "serve", "--dataset", "random", "--num-prompts", "1",
                        "--base-url", "http://127.0.0.1:9"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --base-url")
