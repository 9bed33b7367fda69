"""SSE chunks: the pre-encoded chunk of a text delta (no logprobs, no per-chunk usage) is byte for byte the chunk
the general path builds, for chat and completions, with and without stream_options, with any text."""

from __future__ import annotations

import pytest

from strata.server.protocol import ChatCompletionRequest, CompletionRequest
from strata.server.responses import RequestContext


class _Serving:
    model_name = 'tiny "model" é'


TEXTS = ["", "a", ' "quoted" \\ back\nslash\t', "é ü 日本 🙂", "\u2028\x00\x1f"]


@pytest.mark.parametrize("is_chat", [True, False])
@pytest.mark.parametrize("stream_options", [None, {"include_usage": True}, {"include_usage": False}])
def test_text_chunk_matches_the_general_chunk(is_chat, stream_options):
    kw = {"model": "m", "stream": True, "stream_options": stream_options}
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **kw) if is_chat \
        else CompletionRequest(prompt="hi", **kw)
    ctx = RequestContext(_Serving(), req, is_chat, [[1, 2]], [None], [])
    for index in (0, 3):
        for text in TEXTS:
            for finish in (None, "stop", "length"):
                expected = ctx._chunk([ctx._choice(index, text, finish=finish)])
                assert ctx._text_chunk(index, text, finish) == expected


def test_ids_are_random_without_reading_the_os_per_request(monkeypatch):
    """os.urandom (uuid4) lets go of the GIL mid-request; the ids come from a generator seeded once."""
    import os
    import random
    import re

    from strata.server.protocol import random_id

    def no_urandom(n):
        raise AssertionError("os.urandom read per id")

    monkeypatch.setattr(os, "urandom", no_urandom)
    random.seed(0)
    a = random_id("cmpl-")
    random.seed(0)  # the global generator's seed does not decide them
    b = random_id("cmpl-")
    ctx = RequestContext(_Serving(), CompletionRequest(prompt="hi", model="m"), False, [[1]], [None], [])
    assert a != b and re.fullmatch(r"cmpl-[0-9a-f]{24}", a) and re.fullmatch(r"cmpl-[0-9a-f]{24}", ctx.id)


def _drive(body, disconnect_after: int | None):
    """Runs an SSEResponse over `body`; the client disconnects after that many body chunks. -> (sent bodies,
    on_close calls, the exception raised or None)."""
    import asyncio

    from strata.server.responses import SSEResponse

    async def main():
        sent, closed, gone = [], [], asyncio.Event()

        async def send(message):
            if message["type"] == "http.response.body":
                sent.append(message["body"])
                if disconnect_after is not None and len(sent) >= disconnect_after:
                    gone.set()

        async def receive():
            await gone.wait()
            return {"type": "http.disconnect"}

        response = SSEResponse(body, on_close=lambda: closed.append(1))
        try:
            await asyncio.wait_for(response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send), 60)
        except Exception as e:  # noqa: BLE001 - handed to the test
            return sent, closed, e
        return sent, closed, None

    return asyncio.run(main())


def test_sse_response_ends_when_the_client_goes_away():
    import asyncio

    closed_body = []

    async def body():
        try:
            yield "data: 1\n\n"
            await asyncio.Event().wait()  # an engine stream with nothing more to say
        finally:
            closed_body.append(1)

    sent, closed, err = _drive(body(), disconnect_after=1)
    assert sent == [b"data: 1\n\n"] and closed == [1] and closed_body == [1] and err is None


def test_sse_response_sends_all_and_raises_the_body_error():
    async def body(fail):
        yield "data: 1\n\n"
        yield "data: 2\n\n"
        if fail:
            raise ValueError("boom")

    sent, closed, err = _drive(body(False), disconnect_after=None)
    assert sent == [b"data: 1\n\n", b"data: 2\n\n", b""] and closed == [1] and err is None
    sent, closed, err = _drive(body(True), disconnect_after=None)
    assert sent == [b"data: 1\n\n", b"data: 2\n\n"] and closed == [1] and isinstance(err, ValueError)
