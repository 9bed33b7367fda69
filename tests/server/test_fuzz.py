"""Property test on the app in this process: a few hundred generated malformed, edge-valued and half-valid
requests never get a 5xx nor hang, errors are OpenAI-shaped, no exception escapes the app's handlers (the
TestClient would raise it here), and the engine is idle and healthy afterwards.

Edge values include the ones that used to give 500s: temperatures and penalties that overflow, lone UTF-16
surrogates, token ids beyond the vocabulary, chat_template_kwargs that break rendering.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import within
from tests.server.inprocess import app_client, wait_idle

VOCAB = 2048  # the bundled model's
REQUEST_S = 30  # one request; a slower one counts as a hang

tiny = st.sampled_from([0.0, -0.0, 1e-45, 5e-324, 1e-300, 1e-8, 0.009, 0.01, 1e300, 1.7976931348623157e308])
surrogate_text = st.text(st.characters(codec=None, categories=["Cs", "Ll", "So"]), max_size=6)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.integers(-2**70, 2**70), tiny,
                    st.floats(allow_nan=False, allow_infinity=False, width=32), st.text(max_size=12),
                    surrogate_text)
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                    max_leaves=8)
small_text = st.one_of(st.text(max_size=20), st.text(max_size=20), st.text(max_size=20), surrogate_text)
token_id = st.one_of(st.integers(0, VOCAB - 1), st.sampled_from([VOCAB, VOCAB + 1, 2**31, -1]))
VALID = {
    "temperature": st.one_of(st.floats(0, 2), tiny), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1), "n": st.integers(1, 3), "seed": st.integers(-2**63, 2**63 - 1),
    "stop": st.one_of(small_text, st.lists(small_text, max_size=3)), "stop_token_ids": st.lists(token_id, max_size=3),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.one_of(st.floats(0.5, 2), tiny), "logprobs": st.one_of(st.booleans(), st.integers(0, 5)),
    "logit_bias": st.dictionaries(token_id.map(str), st.floats(-100, 100), max_size=3),
    "top_logprobs": st.integers(0, 5), "echo": st.booleans(), "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 4), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "chat_template_kwargs": st.dictionaries(st.sampled_from(["self", "messages", "x", "add_generation_prompt",
                                                             "template", ""]), junk, max_size=2),
    "priority": st.integers(-5, 5), "max_completion_tokens": st.integers(1, 4),
    "model": st.one_of(st.just("tiny"), small_text), "user": small_text,
    "response_format": st.just({"type": "text"}), "bogus": junk,
}
max_tokens = st.one_of(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.sampled_from([510, 513, 10**6, 2**31]))
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": small_text})
BASE = {
    "/v1/chat/completions": {"messages": st.lists(message, min_size=1, max_size=3),
                             "max_tokens": max_tokens},
    "/v1/completions": {"prompt": st.one_of(small_text, st.lists(token_id, min_size=1, max_size=8),
                                            st.lists(small_text, min_size=1, max_size=2)),
                        "max_tokens": max_tokens},
    "/tokenize": {"prompt": small_text},
    "/detokenize": {"tokens": st.lists(token_id, max_size=8)},
}
SAMPLING = sorted(set(VALID) | {"messages", "prompt", "max_tokens"})
FIELDS = {"/v1/chat/completions": SAMPLING, "/v1/completions": SAMPLING,
          "/tokenize": ["messages", "model", "chat_template_kwargs", "bogus", "stop"],
          "/detokenize": ["model", "prompt", "bogus"]}


def _body(path: str, fields: list[str]):
    """A valid base request with a few fields set: mostly in range, sometimes junk."""
    strategies = dict(BASE[path])
    for k in fields:
        valid = VALID[k] if k in VALID else BASE[path].get(k, junk)
        strategies[k] = st.one_of(valid, valid, valid, junk)
    return st.fixed_dictionaries(strategies)


requests = st.sampled_from(sorted(BASE)) \
    .flatmap(lambda p: st.tuples(st.just(p), st.lists(st.sampled_from(FIELDS[p]), max_size=4, unique=True))) \
    .flatmap(lambda t: st.tuples(st.just(t[0]), _body(*t)))
CHAT_ONLY = {"top_logprobs", "response_format", "chat_template_kwargs", "max_completion_tokens"}
SHAPED = {"/v1/chat/completions": {**{k: v for k, v in VALID.items() if k not in {"echo", "bogus"}},
                                   "logprobs": st.booleans()},
          "/v1/completions": {**{k: v for k, v in VALID.items() if k not in CHAT_ONLY | {"bogus"}},
                              "logprobs": st.integers(0, 5)}}
# Well-formed requests (every field applicable, no junk) with edge values: these reach the engine.
shaped = st.sampled_from(sorted(SHAPED)).flatmap(lambda p: st.tuples(
    st.just(p), st.lists(st.sampled_from(sorted(SHAPED[p])), max_size=5, unique=True))).flatmap(
    lambda t: st.tuples(st.just(t[0]), st.fixed_dictionaries({**BASE[t[0]], **{k: SHAPED[t[0]][k] for k in t[1]}})))
COUNTS = {"requests": 0, "2xx": 0, "4xx": 0, "5xx": 0}


@pytest.fixture(scope="module")
def client():
    with app_client(max_num_seqs=8) as c:
        yield c


def _post(client, path: str, content: bytes):
    COUNTS["requests"] += 1
    r = within(lambda: client.post(path, content=content, headers={"content-type": "application/json"}),
               REQUEST_S)
    COUNTS[f"{r.status_code // 100}xx"] += 1
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["type"] and "\n" not in err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n")
        assert '"error"' not in r.text, r.text
    return r


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(request=requests)
def test_fuzz_bodies_never_5xx(client, request):
    path, body = request
    _post(client, path, json.dumps(body).encode())  # ASCII escapes: lone surrogates travel as \udXXX


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(request=shaped)
def test_fuzz_well_formed_edge_values_never_5xx(client, request):
    path, body = request
    _post(client, path, json.dumps(body).encode())


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=st.one_of(st.binary(max_size=64), st.sampled_from([b'{"prompt": "\\ud800"}', b'{"prompt": "\\udc00x"}',
                                                              b'{"messages": [{"role": "user", "content": "\\uDBFF"}]}',
                                                              b'{"prompt": "\\\\ud800", "max_tokens": 1}'])))
def test_fuzz_raw_bytes_never_5xx(client, raw):
    _post(client, "/v1/chat/completions", raw)
    _post(client, "/v1/completions", raw)


def test_idle_and_healthy_after_fuzz(client):
    assert client.get("/health").status_code == 200
    r = client.post("/v1/completions", json={"prompt": "the", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    wait_idle(client)
    assert COUNTS["5xx"] == 0
    print(f"\nfuzz: {COUNTS['requests']} requests, {COUNTS['2xx']} 2xx, {COUNTS['4xx']} 4xx, "
          f"{COUNTS['5xx']} 5xx, 0 hangs")
