"""IncrementalDetokenizer through tokenizers' DecodeStream hands out exactly what its Python decoding does (the
same deltas after every token, token_ends, stop strings), on random token sequences (byte tokens that split
UTF-8 characters, special tokens) and on encoded text, for every kind of tokenizer the tests have: the bundled
byte-level BPE, a trained byte-level BPE, a sentencepiece vocabulary with byte fallback (stories260k) and
SmolLM2's GGUF tokenizer."""

from __future__ import annotations

import random

import pytest

from strata.engine import detokenizer as detok_module
from strata.engine.detokenizer import IncrementalDetokenizer
from strata.engine.llm_engine import BUNDLED_MODEL
from strata.tokenizer import Tokenizer
from tests.conftest import STORIES260K
from tests.models.conftest import save_tiny_tokenizer

pytestmark = pytest.mark.skipif(detok_module.DecodeStream is None, reason="tokenizers without DecodeStream(ids)")

TEXTS = ["a 漢字 🙂 naïve — done", "the quick brown fox\n\nthe end", "  leading spaces and trailing  ",
         "héllo wörld, ünïcode 日本語 text", "It's 3.14! tab\there"]


def _bundled(tmp_path):
    return Tokenizer(BUNDLED_MODEL)


def _tiny_bpe(tmp_path):
    save_tiny_tokenizer(tmp_path)
    return Tokenizer(str(tmp_path))


def _sentencepiece(tmp_path):
    from strata.weights.sp_tokenizer import build_tokenizer, read_sp_vocab

    if not (STORIES260K / "tok512.model").is_file():
        pytest.skip(f"{STORIES260K} not available")
    build_tokenizer(read_sp_vocab(STORIES260K / "tok512.model")).save(str(tmp_path / "tokenizer.json"))
    return Tokenizer(str(tmp_path))


def _smollm2(tmp_path):
    from strata.weights.gguf_reader import GGUFFile
    from strata.weights.gguf_tokenizer import build_tokenizer
    from tests.server.smollm2 import smollm2_gguf

    build_tokenizer(GGUFFile(smollm2_gguf()))[0].save(str(tmp_path / "tokenizer.json"))
    return Tokenizer(str(tmp_path))


@pytest.fixture(params=[_bundled, _tiny_bpe, _sentencepiece, _smollm2], ids=lambda f: f.__name__[1:])
def tok(request, tmp_path):
    return request.param(tmp_path)


def _run(tok, prompt, output, stop, skip, use_stream):
    """Per token (delta, text, token_ends, stop_hit, tokens emitted), then the final delta; whether the stream
    ran to the end."""
    d = IncrementalDetokenizer(tok, prompt, stop, skip)
    if not use_stream:
        d._use_stream = False
    steps = []
    for t in output:
        d.add(t)
        steps.append((d.take_delta(final=False), d.text, list(d.token_ends), d.stop_hit, d.num_tokens_emitted))
        if d.stop_hit:
            break
    steps.append(d.take_delta(final=True))
    return steps, d._stream is not None


def _sequences(tok, rng):
    """(prompt ids, output ids, whether they are valid text): uniform random ids, and encoded texts split at
    random points."""
    vocab = tok.vocab_size
    for _ in range(60):
        yield ([rng.randrange(vocab) for _ in range(rng.randrange(8))],
               [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))], False)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        for cut in (0, rng.randrange(len(ids)), rng.randrange(len(ids))):
            yield ids[:cut], ids[cut:], True


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("stop", [[], ["e", "th"]])
def test_stream_matches_python_decoding(tok, skip, stop):
    rng = random.Random(0)
    num_random_streamed = 0
    for prompt, output, is_text in _sequences(tok, rng):
        got, streamed = _run(tok, prompt, output, stop, skip, use_stream=True)
        want, _ = _run(tok, prompt, output, stop, skip, use_stream=False)
        assert got == want, (prompt, output)
        if is_text:  # the stream really ran: on text it declines only a prompt whose tail ends inside a character
            assert streamed != tok.decode(prompt[-6:], skip).endswith("\ufffd"), (prompt, output)
        else:  # random bytes also meet a byte-fallback decode that does not extend the one before
            num_random_streamed += streamed
    assert num_random_streamed >= 20


def test_joined_deltas_are_the_decoded_text(tok):
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        steps, streamed = _run(tok, [], ids, [], True, use_stream=True)
        assert streamed and "".join(s[0] for s in steps[:-1]) + steps[-1] == tok.decode(ids)


def test_prompt_ending_inside_a_character_keeps_python_decoding():
    tok = Tokenizer(BUNDLED_MODEL)
    ids = tok.encode("ok 🙂 fine", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    got, streamed = _run(tok, ids[:cut], ids[cut:], [], True, use_stream=True)
    want, _ = _run(tok, ids[:cut], ids[cut:], [], True, use_stream=False)
    assert not streamed and got == want


def test_migrated_state_rebuilds_the_stream(tmp_path):
    """A detokenizer rebuilt from another's fields (live migration) mid-character goes on the same."""
    tok = Tokenizer(BUNDLED_MODEL)
    ids = tok.encode("a 漢字 🙂 naïve — done", add_special_tokens=False)
    ref = IncrementalDetokenizer(tok, [], [], True)
    for t in ids:
        ref.add(t)
    src = IncrementalDetokenizer(tok, [], [], True)
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    for t in ids[:cut]:
        src.add(t)
    moved = IncrementalDetokenizer.__new__(IncrementalDetokenizer)
    vars(moved).update({k: v for k, v in vars(src).items() if k != "_stream"})
    for t in ids[cut:]:
        moved.add(t)
    assert moved._stream is not None and moved.text == ref.text and moved.token_ends == ref.token_ends
