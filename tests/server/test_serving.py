"""Serving.create's inputs: short prompts and chats are tokenized on the event loop, long ones (and grammar
compilation) in a worker thread, with the same ids either way."""

from __future__ import annotations

import asyncio

import pytest

import strata.server.serving as serving_module
from tests.server.inprocess import app_client

LINE = "ROMEO: But soft, what light through yonder window breaks?\n"
LIMIT = 4 * len(LINE)  # GIL_FREE_CHARS for these tests: the bundled model's 512 tokens hold no 4096 characters


@pytest.fixture(scope="module")
def client():
    with app_client() as c:
        yield c


@pytest.fixture
def hops(monkeypatch):
    """The functions Serving sends to a worker thread, in order."""
    monkeypatch.setattr(serving_module, "GIL_FREE_CHARS", LIMIT)
    seen = []
    real = asyncio.to_thread

    async def counting(fn, *args, **kw):
        seen.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args, **kw)

    monkeypatch.setattr(serving_module.asyncio, "to_thread", counting)
    return seen


def _prompt_tokens(client, path: str, body: dict) -> int:
    r = client.post(path, json={"model": "tiny", "max_tokens": 1, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize("repeat, threaded", [(1, False), (LIMIT // len(LINE) + 1, True)])
def test_completion_prompt_ids_inline_or_threaded(client, hops, repeat, threaded):
    text = LINE * repeat
    tok = client.engine.engine.tokenizer
    assert _prompt_tokens(client, "/v1/completions", {"prompt": text}) == len(tok.encode(text))
    assert hops == (["encode"] if threaded else [])


def test_batched_prompts_long_in_all_go_to_a_thread(client, hops):
    texts = [LINE * 3] * 2  # each within the limit, together past it
    tok = client.engine.engine.tokenizer
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": texts, "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == sum(len(tok.encode(t)) for t in texts)
    assert hops == ["encode", "encode"]


@pytest.mark.parametrize("repeat, threaded", [(1, False), (LIMIT // len(LINE) + 1, True)])
def test_chat_prompt_ids_inline_or_threaded(client, hops, repeat, threaded):
    messages = [{"role": "user", "content": LINE * repeat}]
    tok = client.engine.engine.tokenizer
    assert _prompt_tokens(client, "/v1/chat/completions", {"messages": messages}) == len(tok.encode_chat(messages))
    assert hops == (["chat_prompt"] if threaded else [])


def test_only_a_constraint_takes_a_thread(client, hops):
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 2, "guided_choice": ["yes", "no"]}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in ("yes", "no")
    assert hops == ["checked_params"]
    bad = client.post("/v1/completions", json={**body, "guided_regex": "("})
    assert bad.status_code == 400
