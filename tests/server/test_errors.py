"""Every bad-input case gives its status and the OpenAI error object; none gives a 500."""

from __future__ import annotations

import httpx
import pytest

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


def _err(r: httpx.Response, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize("path,body,param", [
    (CHAT, {"messages": MSG, "tools": []}, "tools"),
    (CHAT, {"messages": MSG, "max_tokens": 2, "frobnicate": 1}, "frobnicate"),
    (COMP, {"prompt": "x", "suffix": "y"}, "suffix"),
    (COMP, {"prompt": "x", "best_of": 2}, "best_of"),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages.0.tool_calls"),
    (CHAT, {"messages": MSG, "response_format": {"type": "xml"}}, "response_format.type"),
    (CHAT, {"messages": MSG, "temperature": -1}, "temperature"),
    (CHAT, {"messages": MSG, "top_p": 0}, "top_p"),
    (CHAT, {"messages": MSG, "n": 0}, "n"),
    (CHAT, {"messages": MSG, "max_tokens": 0}, "max_tokens"),
    (CHAT, {"messages": MSG, "top_logprobs": 3}, "top_logprobs"),
    (CHAT, {"messages": MSG, "logit_bias": {"abc": 1}}, "logit_bias"),
    (CHAT, {"messages": MSG, "max_tokens": 2, "min_tokens": 5}, "min_tokens"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    (CHAT, {}, "messages"),
    (COMP, {"prompt": [1, 2, 99999]}, "prompt"),
    (COMP, {"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    (COMP, {"prompt": "x", "n": None, "stream": None, "logprobs": None, "frobnicate": None}, "frobnicate"),
    (COMP, {"prompt": "x", "stream": "yes"}, "stream"),
])
def test_bad_parameters_are_400_naming_the_param(server, path, body, param):
    _err(httpx.post(server.url + path, json=body, timeout=30), 400, param=param)


def test_malformed_json_and_wrong_types(server):
    _err(httpx.post(server.url + CHAT, content=b"{not json", headers={"content-type": "application/json"}), 400)
    _err(httpx.post(server.url + CHAT, json=[1, 2]), 400)
    _err(httpx.post(server.url + CHAT, content=b"", headers={"content-type": "application/json"}), 400)
    _err(httpx.post(server.url + CHAT, content=b'{"messages": NaN}', headers={"content-type": "application/json"}),
         400)


def test_context_length_exceeded(server):
    limit = httpx.get(server.url + "/v1/models").json()["data"][0]["max_model_len"]
    err = _err(httpx.post(server.url + COMP, json={"prompt": [5] * 10, "max_tokens": limit}), 400, "prompt",
               "context_length_exceeded")
    assert str(limit) in err["message"] and f"{limit + 10} tokens (10 in the prompt, {limit} in the completion)" \
        in err["message"]
    err = _err(httpx.post(server.url + CHAT, json={"messages": [{"role": "user", "content": "a " * limit}]}), 400,
               "messages", "context_length_exceeded")
    assert str(limit) in err["message"]


def test_unknown_model_and_route(server):
    _err(httpx.post(server.url + CHAT, json={"model": "gpt-9", "messages": MSG}), 404, "model", "model_not_found")
    _err(httpx.get(server.url + "/v1/nothing"), 404)


def test_body_too_large_is_413(server):
    big = {"messages": [{"role": "user", "content": "x" * (9 * 2**20)}]}
    _err(httpx.post(server.url + CHAT, json=big, timeout=60), 413)


def test_tokenize_detokenize_errors(server):
    _err(httpx.post(server.url + "/tokenize", json={}), 400, "prompt")
    _err(httpx.post(server.url + "/detokenize", json={"tokens": [10**9]}), 400, "tokens")
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "hello"}).json()["tokens"]
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == "hello"


def test_unloadable_model_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    from tests.server.conftest import REPO, free_port

    r = subprocess.run([sys.executable, "-m", "strata.cli", "serve", "--model", str(tmp_path / "missing"),
                        "--port", str(free_port()), "--log-level", "critical"], cwd=REPO, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr
