"""Peak RSS of `strata generate --memory-budget` stays within the budget plus 5% (separate process)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.models.conftest import save_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


def write_mixtral(path: Path, layers: int = 4, experts: int = 8, hidden: int = 256, inter: int = 1024,
                  heads: int = 4, kv_heads: int = 2, vocab: int = 512, max_positions: int = 256) -> int:
    """A random Mixtral-shaped checkpoint; returns the bytes of its routed experts."""
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab,
           "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_local_experts": experts,
           "num_experts_per_tok": 2, "max_position_embeddings": max_positions, "torch_dtype": "float32",
           "bos_token_id": 1, "eos_token_id": 2}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    t = {"model.embed_tokens.weight": rnd(vocab, hidden), "lm_head.weight": rnd(vocab, hidden),
         "model.norm.weight": torch.ones(hidden)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        kv_rows = hidden // heads * kv_heads
        for n, rows in (("q_proj", hidden), ("k_proj", kv_rows), ("v_proj", kv_rows), ("o_proj", hidden)):
            t[f"{p}self_attn.{n}.weight"] = rnd(rows, hidden)
        t[p + "input_layernorm.weight"] = torch.ones(hidden)
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        t[p + "block_sparse_moe.gate.weight"] = rnd(experts, hidden)
        for e in range(experts):
            for n, shape in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
                t[f"{p}block_sparse_moe.experts.{e}.{n}.weight"] = rnd(*shape)
    save_file(t, str(path / "model.safetensors"))
    save_tiny_tokenizer(path)
    return layers * experts * 3 * hidden * inter * 4


def generate(model: Path, budget: str, stats: Path, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "strata.cli", "generate", "the quick brown fox", "--model", str(model), "--memory-budget", budget,
           "--max-tokens", "6", "--temperature", "0", "--num-threads", "1", "--max-num-seqs", "1",
           "--kv-cache-memory", "4MiB", "--max-num-batched-tokens", "64", "--stats-json", str(stats), "--quiet"]
    return subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def run_above_minimum(tmp_path: Path, extra_mib: float) -> tuple[dict, float]:
    """tmp_path/model generated at the minimum budget its refusal names plus extra_mib: (stats, budget MiB)."""
    env = {"STRATA_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    stats = tmp_path / "stats.json"
    refused = generate(tmp_path / "model", "64MiB", stats, env)
    assert refused.returncode == 2 and "is too small" in refused.stderr
    minimum = re.search(r"minimum that would work is --memory-budget (\S+)", refused.stderr)[1]
    budget_mib = float(minimum[:-3]) * (1024 if minimum.endswith("GiB") else 1) + extra_mib
    run = generate(tmp_path / "model", f"{budget_mib:.0f}MiB", stats, env)
    assert run.returncode == 0, run.stderr
    return json.loads(stats.read_text()), budget_mib


def test_peak_rss_within_budget(tmp_path):
    expert_bytes = write_mixtral(tmp_path / "model")  # 96 MiB of experts, 3 MiB each
    # six more 3 MiB slots than the minimum: far less than the 96 MiB of experts
    s, budget_mib = run_above_minimum(tmp_path, 6 * 3)
    assert s["tiered"] and s["expert_cache_slots"] < expert_bytes // (3 << 20)
    assert s["disk_bytes_read"] > 0
    assert s["peak_rss_bytes"] <= 1.05 * budget_mib * (1 << 20), (s["peak_rss_bytes"] / 2**20, budget_mib, s)


def test_peak_rss_within_budget_quantized(tmp_path):
    """The same model at int4-g64: slots, plan and the process's peak RSS all count the quantized experts."""
    from strata.cli import main
    from strata.tiers.store_convert import checkpoint_facts

    write_mixtral(tmp_path / "float")
    assert main(["quantize", "--format", "int4-g64", "--method", "rtn", "--no-progress", str(tmp_path / "float"),
                 str(tmp_path / "model")]) == 0
    facts = checkpoint_facts(tmp_path / "model")
    assert facts.slot_bytes < (3 << 20) // 7  # an expert: 3 MiB in float32, about 400 KiB at int4-g64
    s, budget_mib = run_above_minimum(tmp_path, 6 * facts.slot_bytes / 2**20)  # six more int4 slots
    assert s["tiered"] and s["expert_slot_bytes"] == facts.slot_bytes
    assert s["expert_cache_slots"] < facts.num_experts
    assert s["disk_bytes_read"] % facts.slot_bytes == 0 and s["disk_bytes_read"] > 0
    assert s["peak_rss_bytes"] <= 1.05 * budget_mib * (1 << 20), (s["peak_rss_bytes"] / 2**20, budget_mib, s)
