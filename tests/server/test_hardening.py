"""Requests that used to hang the engine or answer 500: each is now a 4xx with the OpenAI error body (or a
finished response), no exception escapes the app's handlers, and the engine keeps serving."""

from __future__ import annotations

import http.client
import json
import threading

import pytest

from strata.server.request_checks import MAX_CHARS_PER_TOKEN
from tests.conftest import within
from tests.server.inprocess import app_client, metric, wait_idle

HI = [{"role": "user", "content": "hi"}]


def _error(r, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["type"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.fixture(scope="module")
def small_cache():
    """The bundled model with a KV cache of 64 tokens (98304 bytes of float32... of bf16 K/V)."""
    with app_client(kv_cache_memory=98304, dtype="bfloat16") as c:
        yield c


def test_request_longer_than_the_cache_is_400_not_a_hang(small_cache):
    assert small_cache.get("/v1/models").json()["data"][0]["max_model_len"] == 64
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 200, "ignore_eos": True}
    r = within(lambda: small_cache.post("/v1/completions", json=body))
    _error(r, 400, "context_length_exceeded", "prompt")


def test_generation_up_to_the_cache_finishes_with_length(small_cache):
    body = {"messages": HI, "ignore_eos": True, "temperature": 0}  # no max_tokens: up to the context
    r = within(lambda: small_cache.post("/v1/chat/completions", json=body))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["total_tokens"] == 64
    wait_idle(small_cache)


def test_concurrent_requests_filling_the_cache_all_finish(small_cache):
    """Four 40-token requests on a 64-token cache: preemptions, but every one finishes."""
    body = {"prompt": "ROMEO:", "max_tokens": 40, "ignore_eos": True, "temperature": 0}
    results = []

    def one():
        results.append(small_cache.post("/v1/completions", json=body))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    within(lambda: [t.join() for t in threads])
    assert [r.status_code for r in results] == [200] * 4
    assert all(r.json()["usage"]["completion_tokens"] == 40 for r in results)
    assert metric(small_cache, "strata:num_preemptions_total") > 0
    wait_idle(small_cache)


@pytest.fixture(scope="module")
def client():
    with app_client() as c:
        yield c


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "hi", "temperature": 1e-45}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 1e-300}, "repetition_penalty"),
    ("/v1/chat/completions", {"messages": HI, "temperature": 5e-324}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999": 5}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [2048]}, "stop_token_ids"),
])
def test_out_of_range_sampling_is_400(client, path, body, param):
    _error(client.post(path, json=body), 400, param=param)


@pytest.mark.parametrize("path,raw", [
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}'),
    ("/v1/completions", '{"model": "\\ud83d", "prompt": "hi"}'),
    ("/tokenize", '{"prompt": "x\\ud800"}'),
])
def test_lone_surrogate_is_400(client, path, raw):
    _error(client.post(path, content=raw, headers={"content-type": "application/json"}), 400, "invalid_unicode")


def test_surrogate_pair_is_fine(client):
    raw = '{"prompt": "smile \\ud83d\\ude00", "max_tokens": 2}'
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("kwargs", [{"self": 1}, {"messages": "x"}])
def test_chat_template_kwargs_that_break_rendering_are_400(client, kwargs):
    _error(client.post("/v1/chat/completions", json={"messages": HI, "chat_template_kwargs": kwargs}), 400)


def test_text_far_beyond_the_context_is_refused_before_tokenizing(client):
    text = "a" * (512 * MAX_CHARS_PER_TOKEN + 1)
    for path, body in (("/v1/completions", {"prompt": text}), ("/tokenize", {"prompt": text}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]})):
        err = _error(client.post(path, json=body), 400, "context_length_exceeded")
        assert "characters cannot fit" in err["message"]


def test_overload_is_429_without_an_escaping_exception(caplog):
    with app_client(max_queued_requests=0, max_num_seqs=1) as c:
        c.engine._free_slots = 0  # as if the one slot were busy
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        _error(r, 429, "server_overloaded")
        assert r.headers["retry-after"] == "1"
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR"]


def test_free_slots_admit_beyond_the_queue_bound():
    """The bound counts requests that must wait: four free slots take four requests even with a queue of 0."""
    with app_client(max_queued_requests=0, max_num_seqs=4) as c:
        codes = []
        ts = [threading.Thread(target=lambda: codes.append(
            c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code)) for _ in range(4)]
        for t in ts:
            t.start()
        within(lambda: [t.join() for t in ts])
        assert codes == [200] * 4


def test_not_ready_is_503():
    gate = threading.Event()

    def slow_factory():
        gate.wait(30)
        raise RuntimeError("never loads in this test")

    with app_client(factory=slow_factory, wait_ready=False) as c:
        r = c.post("/v1/completions", json={"prompt": "hi"})
        _error(r, 503, "model_loading")
        assert r.headers["retry-after"] == "5"
        gate.set()


def test_cors_is_off_by_default(client):
    r = client.options("/v1/completions", headers={"Origin": "http://evil.example",
                                                   "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_keep_alive_survives_client_errors(server):
    """Under uvicorn: a 400 for a body that used to be a 500 leaves the connection open for the next request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for raw in ('{"prompt": "a\\ud800", "max_tokens": 2}', '{"prompt": "hi", "temperature": 1e-45}'):
            conn.request("POST", "/v1/completions", body=raw, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == 400 and "error" in json.loads(r.read())
            assert not r.will_close
        sock = conn.sock
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200 and conn.sock is sock
    finally:
        conn.close()


def test_every_abort_is_counted_once_per_sequence(client):
    """Aborts count each of the request's n sequences, also when the abort beats the request to the engine."""
    from strata.engine.sampling_params import SamplingParams

    ae = client.engine
    before = metric(client, 'strata:request_success_total{finished_reason="abort"')
    params = SamplingParams(n=2, temperature=0.5, max_tokens=300, ignore_eos=True)

    async def run():
        early = ae.add_request([1, 2, 3], params)
        early.abort()  # before or after the engine thread saw it: either way two sequences aborted
        late = ae.add_request([1, 2, 3], params)
        await late.__anext__()
        late.abort()

    client.portal.call(run)
    wait_idle(client)
    assert metric(client, 'strata:request_success_total{finished_reason="abort"') == before + 4


@pytest.mark.parametrize("prompt", [5, [1, "a"], [[1], "a"], [-1], [[]], {"text": "hi"}])
def test_prompt_shape_errors_name_the_allowed_shapes(client, prompt):
    err = _error(client.post("/v1/completions", json={"prompt": prompt}), 400, param="prompt")
    assert "a string, a list of strings, a list of token ids" in err["message"]
