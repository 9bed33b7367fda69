"""The official `openai` client against a real server: chat and completions, streaming and not, and the raw
SSE bytes against the OpenAI wire format."""

from __future__ import annotations

import json

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_health_version(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/version").json()["model"] == "tiny"


def test_chat_non_streaming(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_chat_streaming_matches_non_streaming(client):
    kw = {"model": "tiny", "messages": [{"role": "user", "content": "the quick brown fox"}], "max_tokens": 8,
              "temperature": 0, "extra_body": {"ignore_eos": True}}
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_completions_streaming_and_not(client):
    kw = {"model": "tiny", "prompt": "the lazy dog", "max_tokens": 7, "temperature": 0, "extra_body": {"ignore_eos": True}}
    r = client.completions.create(**kw)
    assert r.object == "text_completion" and r.usage.completion_tokens == 7
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions_echo_n_logprobs_batch(client):
    r = client.completions.create(model="tiny", prompt="the lazy dog", max_tokens=3, echo=True, temperature=0)
    assert r.choices[0].text.startswith("the lazy dog")
    r = client.completions.create(model="tiny", prompt=["the lazy", "quick fox"], max_tokens=4, n=2,
                                  temperature=0.8, seed=3, logprobs=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    for c in r.choices:
        assert len(c.logprobs.tokens) == 4
        for tok, lp, top in zip(c.logprobs.tokens, c.logprobs.token_logprobs, c.logprobs.top_logprobs):
            assert top[tok] == lp and len(top) in (2, 3)  # the top 2 and the chosen token, as OpenAI
    assert r.usage.completion_tokens == 16


def test_chat_logprobs_seed_stop(client):
    kw = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 1.0,
              "seed": 11, "logprobs": True, "top_logprobs": 3, "extra_body": {"ignore_eos": True}}
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    content = a.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 for t in content)
    text = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    stop = text[3:5]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                       temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].message.content


def test_raw_sse_bytes(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and {c["created"] for c in chunks} == {chunks[0]["created"]}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1])
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    # without include_usage: no usage key and no usage chunk
    body.pop("stream_options")
    raw = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).text
    chunks = [json.loads(e[6:]) for e in raw.split("\n\n")[:-2]]
    assert all("usage" not in c and c["choices"] for c in chunks)


def test_prefix_cache_hit_reported(client):
    prompt = "the quick brown fox jumps over the lazy dog. " * 6
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16
    assert again.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens_details.cached_tokens - 1
    assert again.choices[0].text == first.choices[0].text
