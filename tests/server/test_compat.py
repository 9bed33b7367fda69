"""What real clients send beyond the basics: null for optional fields, OpenAI-only fields that are ignored,
models.retrieve, usage on every chunk, and streamed logprobs that travel with their own chunk's text."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _events(r: httpx.Response) -> list[dict]:
    return [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]


def test_null_means_default(server):
    nulls = {"n": None, "stream": None, "logprobs": None, "stop": None, "seed": None, "temperature": None,
             "top_p": None, "max_tokens": None, "presence_penalty": None, "stream_options": None, "user": None}
    r = httpx.post(server.url + CHAT, json={"messages": MSG, **nulls, "top_logprobs": None}, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None
    r = httpx.post(server.url + COMP, json={"prompt": "x", **nulls, "echo": None}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16  # max_tokens null: default 16
    r = httpx.post(server.url + CHAT, json={"messages": None})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_openai_only_fields_are_ignored(server, client):
    extra = {"store": False, "metadata": {"k": "v"}, "service_tier": "auto", "reasoning_effort": "low",
             "user": "u1", "parallel_tool_calls": True, "prompt_cache_key": "c", "safety_identifier": "s"}
    r = httpx.post(server.url + CHAT, json={"messages": MSG, "max_tokens": 2, **extra}, timeout=60)
    assert r.status_code == 200, r.text
    r = client.completions.create(model="tiny", prompt="x", max_tokens=2, user="u1",
                                  extra_body={"store": True, "metadata": {"a": "b"}})
    assert r.usage.completion_tokens <= 2


def test_models_retrieve(client):
    m = client.models.retrieve("tiny")
    assert m.id == "tiny" and m.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_continuous_usage_stats(server):
    body = {"messages": MSG, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = _events(httpx.post(server.url + CHAT, json=body, timeout=60))
    usages = [c["usage"] for c in chunks]
    assert all(u is not None for u in usages)
    assert [u["completion_tokens"] for u in usages] == sorted(u["completion_tokens"] for u in usages)
    assert usages[-1]["completion_tokens"] == 4 and chunks[-1]["choices"] == []
    assert len({u["prompt_tokens"] for u in usages}) == 1


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_streamed_logprobs_align_with_chunk_text(server, kind):
    """Each chunk's logprobs are of the tokens whose text it carries: the concatenated chunk texts equal the
    concatenated token texts, chunk by chunk, including when a stop string holds text back."""
    common = {"max_tokens": 24, "temperature": 0, "ignore_eos": True, "stream": True, "logprobs": True}
    if kind == "chat":
        body = {"messages": MSG, **common, "top_logprobs": 1}
    else:
        body = {"prompt": "the quick brown fox", **common, "logprobs": 1}
    path = CHAT if kind == "chat" else COMP
    for stop in (None, ["zzqx"]):  # a stop string that never matches still holds back its length - 1 chars
        chunks = _events(httpx.post(server.url + path, json={**body, "stop": stop}, timeout=60))
        text_so_far, tokens_so_far = "", ""
        for c in chunks:
            ch = c["choices"][0]
            if kind == "chat":
                text = ch["delta"].get("content") or ""
                toks = [t["token"] for t in (ch["logprobs"] or {}).get("content", [])]
            else:
                text = ch["text"]
                toks = (ch["logprobs"] or {}).get("tokens", [])
            text_so_far += text
            tokens_so_far += "".join(toks)
            assert tokens_so_far == text_so_far, (text, toks)
        assert len(tokens_so_far) > 0
