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
