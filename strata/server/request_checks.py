"""Cheap checks on a request before the expensive work: a lone UTF-16 surrogate anywhere in the JSON body
(it cannot be tokenized nor encoded back into a response), and text so long that it cannot fit the context
whatever the tokenizer does (tokenizers' encode holds the GIL: a megabyte of text stalls every stream)."""

from __future__ import annotations

import json
import re

from strata.errors import InvalidRequestError

# No real tokenizer's token is longer than this many characters; text beyond max_model_len x it cannot fit.
MAX_CHARS_PER_TOKEN = 64
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # a surrogate reaches Python only as a JSON escape


def has_lone_surrogate(body: bytes) -> bool:
    """Whether the JSON body holds a string with an unpaired surrogate (a pair, e.g. an escaped emoji, is fine)."""
    if not _ESCAPED_SURROGATE.search(body):
        return False
    try:
        obj = json.loads(body)
    except ValueError:
        return False  # not JSON: the route's parser answers that
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_text_length(num_chars: int, max_model_len: int, param: str) -> None:
    limit = max_model_len * MAX_CHARS_PER_TOKEN
    if num_chars > limit:
        raise InvalidRequestError(
            f"{param}: {num_chars} characters cannot fit this model's maximum context length of {max_model_len} "
            f"tokens (at most {limit} characters are tokenized)", param=param, code="context_length_exceeded")
