"""Peak RSS under --memory-budget with long prompts, batches of them and a full KV cache (fresh child processes).

The budget is a promise: peak RSS at most the budget + 5% whatever the prompt length, batch size and step token
budget. The model computes in bfloat16 (oneDNN matmuls: the caches strata/tiers/retention.py bounds).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.tiers.test_rss import REPO, write_mixtral

CHILD = r"""
import json, sys
import torch
from strata import LLM
from strata.engine.sampling_params import SamplingParams
from strata.engine.stats import peak_rss_bytes
from strata.tiers.budget import current_rss
from strata.units import parse_size
model, budget, n, length, step_tokens = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
llm = LLM(model, progress=False, memory_budget=parse_size(budget), dtype="bfloat16", max_num_seqs=12, max_model_len=2048,
          kv_cache_memory=4 << 20, max_num_batched_tokens=step_tokens, num_threads=1)
loaded = current_rss()
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(3, 4000, (length,), generator=g).tolist() for _ in range(n)]
outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
assert all(len(o.outputs[0].token_ids) == 40 for o in outs)
print(json.dumps({"peak": peak_rss_bytes(), "loaded": loaded, "plan": llm.engine.tiers.plan.to_dict(),
                  "num_preemptions": llm.engine.scheduler.num_preemptions,
                  "step_tokens": llm.engine.scheduler.max_num_batched_tokens}))
"""


def run_child(model, budget: str, n: int, length: int, step_tokens: int, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", CHILD, str(model), budget, str(n), str(length), str(step_tokens)]
    return subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A random Mixtral with long positions, and a budget a few expert slots above the minimum it needs."""
    tmp = tmp_path_factory.mktemp("rss_long")
    write_mixtral(tmp / "model", layers=2, experts=8, hidden=256, inter=1024, heads=8, kv_heads=2, vocab=4096,
                  max_positions=4096)
    env = {"STRATA_CACHE_DIR": str(tmp / "cache"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    refused = run_child(tmp / "model", "64MiB", 1, 8, 2048, env)
    minimum = re.search(r"minimum that would work is --memory-budget (\S+)", refused.stderr)
    assert minimum, refused.stderr[-2000:]
    mib = float(minimum[1][:-3]) * (1024 if minimum[1].endswith("GiB") else 1)
    return tmp / "model", mib + 2 * 3, env  # two more 3 MiB slots (the store keeps the float32 experts)


@pytest.mark.parametrize(("n", "length", "step_tokens"), [(1, 2000, 512), (12, 1000, 2048)],
                         ids=["one-2000-token-prompt", "12x1000-tokens-full-kv-cache"])
def test_peak_rss_within_budget_long_prompts(long_model, n, length, step_tokens):
    model, budget_mib, env = long_model
    run = run_child(model, f"{budget_mib:.0f}MiB", n, length, step_tokens, env)
    assert run.returncode == 0, run.stderr[-3000:]
    s = json.loads(run.stdout.strip().splitlines()[-1])
    plan = s["plan"]
    assert plan["num_slots"] < plan["max_slots"]  # experts are served from disk
    if n > 1:
        assert s["num_preemptions"] > 0  # 12 x 1,000 tokens overfill the 4 MiB KV cache
    peak_mib = s["peak"] / 2**20
    assert peak_mib <= 1.05 * budget_mib, (peak_mib, budget_mib, s)
    # what the steps added to the loaded engine is what the plan reserved for them (the KV cache's pages are
    # touched as it fills): the activation estimate holds against the measured peak
    assert s["peak"] - s["loaded"] <= plan["activation_bytes"] + plan["kv_bytes"], s


def test_step_token_budget_lowered_to_fit(long_model):
    """A budget too small for the activations of --max-num-batched-tokens 8192 plans smaller steps instead."""
    model, budget_mib, env = long_model
    run = run_child(model, f"{budget_mib:.0f}MiB", 1, 300, 8192, env)
    assert run.returncode == 0, run.stderr[-3000:]
    s = json.loads(run.stdout.strip().splitlines()[-1])
    assert 64 <= s["step_tokens"] < 8192
    assert s["plan"]["max_num_batched_tokens"] == s["step_tokens"]
    assert s["peak"] / 2**20 <= 1.05 * budget_mib
