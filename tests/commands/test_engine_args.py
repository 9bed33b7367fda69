"""Every command's engine flags come from EngineConfig's fields, and every size flag reads sizes the same way."""

import dataclasses

import pytest

from strata.cli import build_parser, main
from strata.commands.engine_args import engine_config_from_args
from strata.config import EngineConfig

ENGINE_COMMANDS = (["serve"], ["generate", "hi"], ["chat"])
SIZES = {"4G": 4 << 30, "4GiB": 4 << 30, "4096MiB": 4 << 30, "4GB": 4 * 10**9, "1.5 GiB": 3 << 29, "512MiB": 1 << 29}


@pytest.mark.parametrize("cmd", ENGINE_COMMANDS, ids=lambda c: c[0])
def test_every_engine_field_is_a_flag(cmd):
    args = build_parser().parse_args(cmd)
    for f in dataclasses.fields(EngineConfig):
        assert "help" in f.metadata, f.name
        if f.name not in ("model", "seed"):  # generate's --seed seeds sampling; serve takes MODEL positionally
            assert hasattr(args, f.name), (cmd[0], f.name)


@pytest.mark.parametrize("cmd", ENGINE_COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("text", SIZES)
def test_size_flags_agree(cmd, text):
    args = build_parser().parse_args([*cmd, "--memory-budget", text, "--kv-cache-memory", text])
    cfg = engine_config_from_args(args)
    assert cfg.memory_budget == cfg.kv_cache_memory == SIZES[text]


@pytest.mark.parametrize("text", SIZES)
def test_plan_budget_reads_sizes_like_the_engine(text, monkeypatch):
    from strata.analysis import planner

    seen = []
    monkeypatch.setattr(planner, "plan", lambda shape, sys, budget, *a: seen.append(budget) or [])
    monkeypatch.setattr(planner, "explain", lambda *a: "")
    main(["plan", "--model", "Qwen3-30B-A3B", "--memory-budget", text, "--runs", "/nonexistent/runs.jsonl"])
    assert seen == [SIZES[text]]


def test_serve_takes_the_tier_flags():
    args = build_parser().parse_args(["serve", "--memory-budget", "3GiB", "--expert-cache-policy", "lru",
                                      "--prefetch", "lookahead", "--miss-fallback", "renormalize"])
    cfg = engine_config_from_args(args, model="m")
    assert (cfg.memory_budget, cfg.expert_cache_policy, cfg.prefetch, cfg.miss_fallback) == (
        3 << 30, "lru", "lookahead", "renormalize")


@pytest.mark.parametrize("flag", ["--memory-budget", "--kv-cache-memory"])
def test_bad_size_is_one_line_exit_2(flag, capsys):
    assert main(["serve", flag, "lots"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag}: expected a number" in err


def test_unknown_choice_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--miss-fallback", "guess"])
    assert e.value.code == 2 and "invalid choice: 'guess'" in capsys.readouterr().err


def test_eval_takes_the_engine_flags_with_its_own_dtype_default():
    args = build_parser().parse_args(["eval", "kl", "--model", "a", "--reference", "b", "--data", "t.txt"])
    assert args.dtype == "float32"
    args = build_parser().parse_args(["eval", "ppl", "--data", "t.txt", "--dtype", "bfloat16"])
    assert (args.model, args.dtype) == (None, "bfloat16")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "ppl", "--data", "t.txt", "--dtype", "int3"])


def test_serve_starts_with_a_size_string_budget_and_the_tier_flags():
    import httpx

    from tests.server.conftest import BUNDLED, Server

    srv = Server(BUNDLED, "--memory-budget", "3GiB", "--kv-cache-memory", "64MiB", "--expert-cache-policy", "lru",
                 "--prefetch", "lookahead", "--miss-fallback", "renormalize")
    try:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 4, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        srv.stop()
