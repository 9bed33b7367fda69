"""Cheap checks on a request before the expensive work: where it comes from (Host and Origin headers), a lone
UTF-16 surrogate anywhere in the JSON body (it cannot be tokenized nor encoded back into a response), and text
so long that it cannot fit the context whatever the tokenizer does (tokenizers' encode holds the GIL: a
megabyte of text stalls every stream)."""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

from strata.errors import InvalidRequestError
from strata.server.errors import APIError

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


LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "::1"]


def _hostname(netloc: str) -> str:
    try:
        return (urlsplit("//" + netloc).hostname or "").lower()
    except ValueError:  # a malformed port or bracket
        return ""


def origin_error(headers: dict[str, str], allowed_hosts: list[str] | None,
                 allowed_origins: list[str] | None) -> APIError | None:
    """The APIError refusing a request from elsewhere, or None. A server bound to loopback answers only Host
    names that are loopback (a DNS-rebinding page reaches it under its own name), and a request carrying a
    browser's Origin must come from a loopback page or an --allowed-origins one (a page cannot read the answer
    without CORS, but a form post would still make the server generate)."""
    if allowed_hosts is not None and _hostname(headers.get("host", "")) not in allowed_hosts:
        return APIError(400, f"Host {headers.get('host', '')!r} is not served: this server is bound to loopback and "
                             "answers localhost, 127.0.0.1 and [::1] (bind --host to serve other names)",
                        code="invalid_host")
    origin = headers.get("origin")
    if origin is None:  # not a browser
        return None
    allowed = allowed_origins or []
    if "*" in allowed or origin in allowed or _hostname(origin.split("://", 1)[-1]) in LOOPBACK_HOSTS:
        return None
    return APIError(403, f"Origin {origin!r} is not allowed (list it in --allowed-origins to serve browser pages "
                         "from it)", code="origin_not_allowed")
