"""Tokenizer.encode: long texts go through encode_batch (which releases the GIL) with the same ids, and text
that is not valid Unicode is one InvalidRequestError on either path."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer

from strata.engine.llm_engine import BUNDLED_MODEL
from strata.errors import InvalidRequestError
from strata.tokenizer import GIL_FREE_CHARS, Tokenizer

TEXT = "ROMEO: But soft, what light through yonder window breaks?\n"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(BUNDLED_MODEL)


@pytest.mark.parametrize("repeat", [1, GIL_FREE_CHARS // len(TEXT) + 1])
@pytest.mark.parametrize("special", [True, False])
def test_same_ids_either_path(tok, repeat, special):
    text = TEXT * repeat
    ref = HFTokenizer.from_file(f"{BUNDLED_MODEL}/tokenizer.json").encode(text, add_special_tokens=special).ids
    got = tok.encode(text, add_special_tokens=special)
    assert got[-len(ref):] == ref and len(got) - len(ref) in (0, 1)  # 1: a BOS the config asks for


@pytest.mark.parametrize("length", [10, GIL_FREE_CHARS + 10])
def test_lone_surrogate_is_a_request_error(tok, length):
    with pytest.raises(InvalidRequestError, match="not valid Unicode"):
        tok.encode("a" * length + "\ud800")


def test_chat_templates_compiled_once_each_render_their_own(tok):
    messages = [{"role": "user", "content": "hi"}]
    other = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    own = tok.apply_chat_template(messages, add_generation_prompt=False)
    for _ in range(2):  # alternating sources: each cached template stays its own
        assert tok.apply_chat_template(messages, template=other) == "<user>hi"
        assert tok.apply_chat_template(messages, add_generation_prompt=False) == own
    assert own != "<user>hi"
