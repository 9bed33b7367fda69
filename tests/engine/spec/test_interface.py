"""`--speculative-config` on generate and serve: stats keys, /metrics counters, streaming, and bad input as
one line with exit 2 (unknown method, k outside 1..16, a draft whose vocabulary differs)."""

from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest

from strata.cli import main
from strata.engine.llm_engine import BUNDLED_MODEL
from strata.engine.spec.config import SpeculativeConfig
from strata.errors import ConfigError

DRAFT = os.path.join(os.path.dirname(BUNDLED_MODEL), "shakespeare-draft")
pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(DRAFT, "config.json")), reason="bundled models not present"
)
NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}'


@pytest.mark.parametrize(
    "spec", [json.dumps({"model": DRAFT, "num_speculative_tokens": 3}), NGRAM], ids=["draft", "ngram"]
)
def test_generate_stats_json(tmp_path, capsys, spec):
    stats = tmp_path / "stats.json"
    args = [
        "generate",
        "ROMEO:",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--dtype",
        "float32",
        "--quiet",
        "--speculative-config",
        spec,
        "--stats-json",
        str(stats),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    got = json.loads(stats.read_text())
    assert got["generated_tokens"] == 24 and got["spec_num_draft_tokens"] > 0
    assert 0 <= got["spec_acceptance_rate"] <= 1 and got["spec_mean_accepted_tokens"] >= 0
    assert main(args[:-4]) == 0  # the same command without speculation prints the same text
    assert capsys.readouterr().out == text


def _different_vocab(tmp_path) -> str:
    bad = tmp_path / "draft"
    shutil.copytree(DRAFT, bad)
    tok = json.loads((bad / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first = next(t for t in vocab if vocab[t] == 5)
    vocab["zz-not-in-target"] = vocab.pop(first)
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    return str(bad)


@pytest.mark.parametrize(
    "spec,expect",
    [
        ('{"method": "eagle9", "num_speculative_tokens": 4}', "'method' must be one of"),
        (
            '{"method": "ngram", "num_speculative_tokens": 0}',
            "'num_speculative_tokens' must be an integer in 1..16",
        ),
        (
            '{"method": "ngram", "num_speculative_tokens": 17}',
            "'num_speculative_tokens' must be an integer in 1..16",
        ),
        ('{"method": "ngram", "k": 2}', "unknown key(s) k"),
        ('{"num_speculative_tokens": 4', "invalid JSON"),
        ('{"model": "/no/such/draft", "num_speculative_tokens": 4}', "not found"),
        ("VOCAB", "tokenizer.json differs from the target's"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, spec, expect):
    if spec == "VOCAB":
        spec = json.dumps({"model": _different_vocab(tmp_path), "num_speculative_tokens": 4})
    assert main(["generate", "x", "--max-tokens", "2", "--speculative-config", spec]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--speculative-config" in err and expect in err


def test_vocab_size_mismatch(tmp_path):
    bad = tmp_path / "draft"
    shutil.copytree(DRAFT, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vocab_size"] += 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="vocab_size 2049"):
        from strata import LLM

        LLM(None, progress=False, speculative_config={"model": str(bad), "num_speculative_tokens": 2})


def test_config_accepts_vllm_shapes():
    assert SpeculativeConfig.from_value({"model": DRAFT, "num_speculative_tokens": 4}).method == "draft_model"
    cfg = SpeculativeConfig.from_value(NGRAM)
    assert (cfg.method, cfg.num_speculative_tokens, cfg.prompt_lookup_max) == ("ngram", 4, 4)
    assert SpeculativeConfig.from_value(None) is None


def test_serve_streams_accepted_tokens_and_counts_them():
    from tests.server.conftest import BUNDLED, Server

    ref = Server(BUNDLED, "--dtype", "float32")
    srv = Server(
        BUNDLED,
        "--dtype",
        "float32",
        "--speculative-config",
        json.dumps({"model": DRAFT, "num_speculative_tokens": 4}),
    )
    try:
        body = {
            "model": "shakespeare-moe",
            "prompt": "ROMEO:\n",
            "max_tokens": 32,
            "temperature": 0,
            "ignore_eos": True,
        }
        want = httpx.post(ref.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        pieces = []
        with httpx.stream(
            "POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=60
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    pieces.extend(c["text"] for c in json.loads(line[6:])["choices"])
        assert "".join(pieces) == want
        m = srv.metrics()
        assert m["strata:spec_decode_num_draft_tokens_total"] > 0
        assert (
            0
            < m["strata:spec_decode_num_accepted_tokens_total"]
            <= m["strata:spec_decode_num_draft_tokens_total"]
        )
        assert ref.metrics().get("strata:spec_decode_num_draft_tokens_total", 0) == 0
    finally:
        ref.stop()
        srv.stop()
