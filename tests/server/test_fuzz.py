"""Property test: malformed and half-valid bodies never get a 500, errors are OpenAI-shaped, and the server
stays healthy afterwards."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=False, allow_infinity=False, width=32), st.text(max_size=12))
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                    max_leaves=8)
small_text = st.text(max_size=20)
VALID = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1), "n": st.integers(1, 3), "seed": st.integers(-2**63, 2**63 - 1),
    "stop": st.one_of(small_text, st.lists(small_text, max_size=3)), "stop_token_ids": st.lists(st.integers(0, 400)),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2), "logprobs": st.one_of(st.booleans(), st.integers(0, 5)),
    "logit_bias": st.dictionaries(st.integers(0, 400).map(str), st.floats(-100, 100), max_size=3),
    "top_logprobs": st.integers(0, 5), "echo": st.booleans(), "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 4), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "chat_template_kwargs": st.dictionaries(st.text(max_size=8), scalars, max_size=2),
    "priority": st.integers(-5, 5), "max_completion_tokens": st.integers(1, 4), "model": st.just("tiny"),
    "user": small_text, "response_format": st.just({"type": "text"}), "bogus": junk,
}
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": small_text})
BASE = {
    "/v1/chat/completions": {"messages": st.lists(message, min_size=1, max_size=3), "max_tokens": st.integers(1, 4)},
    "/v1/completions": {"prompt": st.one_of(small_text, st.lists(st.integers(0, 319), min_size=1, max_size=8),
                                            st.lists(small_text, min_size=1, max_size=2)),
                        "max_tokens": st.integers(1, 4)},
}
FIELDS = sorted(set(VALID) | {"messages", "prompt", "max_tokens"})


def _body(path: str, fields: list[str]):
    """A valid base request with a few fields set: mostly in range, sometimes junk."""
    strategies = dict(BASE[path])
    for k in fields:
        valid = VALID[k] if k in VALID else BASE[path].get(k, junk)
        strategies[k] = st.one_of(valid, valid, valid, junk)
    return st.fixed_dictionaries(strategies)


requests = st.tuples(st.sampled_from(sorted(BASE)), st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)) \
    .flatmap(lambda t: st.tuples(st.just(t[0]), _body(*t)))


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _check(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and "type" in err
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n")
        assert '"error"' not in r.text, r.text


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(request=requests)
def test_fuzz_bodies_never_500(http, request):
    path, body = request
    _check(http.post(path, json=body))


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=st.binary(max_size=64))
def test_fuzz_raw_bytes_never_500(http, raw):
    _check(http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}))


def test_still_healthy_after_fuzz(server, http):
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={"prompt": "the", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    m = server.wait_metric("strata:kv_cache_blocks_used", lambda v: v == 0)
    assert m["strata:num_requests_running"] == 0
