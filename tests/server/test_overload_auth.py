"""A server with an API key, one running sequence and a waiting queue of one: the key is enforced, a full
queue gets 429 with Retry-After, and SIGTERM lets the running request finish before the process exits.
(The SIGTERM test stops the module's server, so it comes last.)"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = {"prompt": "the quick brown fox", "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}


def test_api_key_enforced(guarded_server):
    url = guarded_server.url
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(url + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.post(url + "/v1/completions", json=body, headers=AUTH).status_code == 200
    assert httpx.get(url + "/health").status_code == 200  # public
    bad = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    assert good.models.list().data[0].id == "tiny"


def test_small_body_limit_is_413(guarded_server):
    r = httpx.post(guarded_server.url + "/v1/completions", json={"prompt": "x" * 5000}, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_chat_template_kwargs_reach_the_template(guarded_server):
    server = guarded_server
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"greeting": "howdy"}}
    with_kw = httpx.post(server.url + "/tokenize", json=body, headers=AUTH).json()["tokens"]
    without = httpx.post(server.url + "/tokenize", json={"messages": body["messages"]}, headers=AUTH).json()["tokens"]
    assert len(with_kw) > len(without)
    text = httpx.post(server.url + "/detokenize", json={"tokens": with_kw}, headers=AUTH).json()["prompt"]
    assert "howdy assistant:" in text


def test_full_queue_gets_429(guarded_server):
    srv = guarded_server
    c1 = httpx.Client(base_url=srv.url, headers=AUTH, timeout=60)
    c2 = httpx.Client(base_url=srv.url, headers=AUTH, timeout=60)
    with c1, c2, c1.stream("POST", "/v1/completions", json=LONG) as running:
        assert running.status_code == 200
        srv.wait_metric("strata:num_requests_running", lambda v: v == 1)
        with c2.stream("POST", "/v1/completions", json=LONG) as waiting:
            assert waiting.status_code == 200
            srv.wait_metric("strata:num_requests_waiting", lambda v: v == 1)
            r = httpx.post(srv.url + "/v1/completions", json={**LONG, "stream": False}, headers=AUTH)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0).completions.create(
                    model="tiny", prompt="x", max_tokens=2)
    m = srv.wait_metric("strata:kv_cache_blocks_used", lambda v: v == 0)
    assert m["strata:num_requests_waiting"] == 0


def test_sigterm_drains_running_request(guarded_server):
    srv = guarded_server
    body = {**LONG, "max_tokens": 400}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        srv.proc.terminate()
        rest = "\n".join(lines)
    events = [json.loads(x[6:]) for x in rest.split("\n") if x.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert rest.rstrip().endswith("data: [DONE]")
    assert srv.proc.wait(60) in (0, -15)  # uvicorn re-raises SIGTERM once it has shut down cleanly
