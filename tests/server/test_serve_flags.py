"""`strata serve` flags as vLLM names them: a positional model, --chat-template (inline or file), --tokenizer,
--seed, --allowed-origins; --max-model-len beyond the model's positions refused; `strata --version` and
`python -m strata`."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.server.conftest import REPO, Server, free_port

TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "strata", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)


def test_version_and_python_dash_m():
    import strata

    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"strata {strata.__version__}"


@pytest.mark.parametrize("flags,words", [
    (("--max-model-len", "100000"), ["--max-model-len 100000", "max_position_embeddings", "rope_scaling"]),
    (("--chat-template", "missing.jinja"), ["--chat-template", "missing.jinja"]),
    (("--chat-template", "{% if %}"), ["--chat-template", "Jinja"]),
    (("--enable-migration",), ["--enable-migration", "--data-parallel-size >= 2"]),
    (("--data-parallel-size", "2", "--migration-max-stages", "0"), ["--migration-max-stages must be >= 1"]),
    (("--stream-interval-ms", "-1"), ["--stream-interval-ms", ">= 0", "-1"]),
    (("--max-tpot-ms", "0"), ["--max-tpot-ms", "positive"]),
    (("--engine-nice", "25"), ["--engine-nice", "-20..19", "25"]),
    (("--data-parallel-size", "2", "--engine-nice", "1"), ["--engine-nice", "Ray"]),
])
def test_bad_flags_exit_2_with_one_line(tiny_model, flags, words):
    r = _cli("serve", str(tiny_model), "--port", str(free_port()), *flags)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(w in line for w in words), line


@pytest.fixture(scope="module")
def flagged_server(tiny_model, tmp_path_factory):
    template = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    template.write_text(TEMPLATE)
    srv = Server(tiny_model, "--chat-template", str(template), "--tokenizer", str(tiny_model), "--seed", "7",
                 "--allowed-origins", "http://example.test", "--served-model-name", "named")
    yield srv
    srv.stop()


def test_chat_template_file_tokenizer_and_cors(flagged_server):
    url = flagged_server.url
    msgs = [{"role": "user", "content": "hi"}]
    via_chat = httpx.post(url + "/tokenize", json={"messages": msgs}).json()["tokens"]
    rendered = httpx.post(url + "/tokenize", json={"prompt": "<<user>>hi", "add_special_tokens": False}).json()
    assert via_chat == rendered["tokens"]
    r = httpx.options(url + "/v1/chat/completions", headers={"Origin": "http://example.test",
                                                             "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://example.test"
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "named"


def test_positional_model_and_inline_template(tiny_model):
    srv = Server(tiny_model, "--chat-template", TEMPLATE.replace("<<", "[["), "--max-model-len", "64",
                 positional=True)
    try:
        assert srv.max_model_len == 64
        ids = httpx.post(srv.url + "/tokenize", json={"messages": [{"role": "user", "content": "x"}]}).json()
        assert httpx.post(srv.url + "/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "[[user>>x"
    finally:
        srv.stop()


def _nice_of_tasks(pid: int) -> dict[int, int]:
    """thread id -> nice value of every thread of process pid (Linux /proc, field 19 of stat)."""
    from pathlib import Path

    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        out[int(task.name)] = int(fields[16])
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_engine_nice_applies_to_the_engine_thread_not_the_event_loop(tiny_model):
    srv = Server(tiny_model, "--engine-nice", "3")
    try:
        nices = _nice_of_tasks(srv.proc.pid)
        assert nices[srv.proc.pid] == 0  # the main thread (the event loop) keeps the process's value
        # the engine thread, and the threads it started (they inherit it: compute threads, the file guard)
        assert 3 in nices.values() and set(nices.values()) == {0, 3}, nices
        r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3},
                       timeout=60)
        assert r.status_code == 200, r.text
    finally:
        srv.stop()


def test_engine_nice_refused_without_the_right(monkeypatch):
    import os

    from strata.commands.serve import set_thread_nice
    from strata.errors import ConfigError

    def refuse(*_):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "setpriority", refuse)
    with pytest.raises(ConfigError, match="--engine-nice -5: not permitted .*CAP_SYS_NICE"):
        set_thread_nice(-5)
