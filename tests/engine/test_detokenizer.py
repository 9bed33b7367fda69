"""Streaming text: multi-byte UTF-8 split across byte tokens is never emitted half-way."""

from strata.engine.detokenizer import IncrementalDetokenizer
from strata.tokenizer import Tokenizer
from tests.models.conftest import save_tiny_tokenizer


def test_multibyte_characters_split_across_tokens(tmp_path):
    save_tiny_tokenizer(tmp_path)
    tok = Tokenizer(str(tmp_path))
    text = "a 漢字 🙂 naïve — done"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # rare characters really are split into byte tokens
    d = IncrementalDetokenizer(tok, [], stop=[], skip_special_tokens=True)
    deltas = []
    for i in ids:
        d.add(i)
        delta = d.take_delta(final=False)
        assert "\ufffd" not in delta
        deltas.append(delta)
    deltas.append(d.take_delta(final=True))
    assert "".join(deltas) == text


def test_stop_string_held_back_until_decided(tmp_path):
    save_tiny_tokenizer(tmp_path)
    tok = Tokenizer(str(tmp_path))
    ids = tok.encode("the quick brown fox", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [], stop=["brown"], skip_special_tokens=True)
    emitted = ""
    for i in ids:
        d.add(i)
        emitted += d.take_delta(final=d.stop_hit is not None)
        if d.stop_hit:
            break
    assert d.stop_hit == "brown"
    assert emitted == "the quick "
