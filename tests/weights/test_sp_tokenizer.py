"""tok512 (.bin and .model) rebuilt as an HF `tokenizers` BPE: ids against run.c references and sentencepiece."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from strata.errors import WeightsError
from strata.weights.sp_tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, build_tokenizer, read_sp_vocab

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
STORIES = DATA / "stories260k"
VALID = DATA / "tinystories-valid100" / "validation_100.txt"

pytestmark = pytest.mark.skipif(not (STORIES / "tok512.bin").is_file(), reason="../shared/data/stories260k absent")

TRICKY = ["", " ", "  a  b  ", "héllo wörld 😀 123456", "tab\there", "  leading", "trailing   ",
          "line\nbreak", "日本語", "a\u200ab", "It's 3.14!"]


@pytest.fixture(scope="module")
def tokenizers_by_source():
    return {name: build_tokenizer(read_sp_vocab(STORIES / name)) for name in ("tok512.bin", "tok512.model")}


@pytest.fixture(scope="module")
def greedy_cases():
    cases = json.loads((STORIES / "reference_outputs.json").read_text())["cases"]
    return {k: c for k, c in cases.items() if "derived_sequence_token_ids" in c}


def test_bin_and_model_give_the_same_tokenizer(tokenizers_by_source):
    a, b = tokenizers_by_source.values()
    assert a.to_str() == b.to_str()


def test_model_reader_matches_sentencepiece():
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(STORIES / "tok512.model"))
    vocab = read_sp_vocab(STORIES / "tok512.model")
    assert len(vocab.pieces) == sp.get_piece_size() == 512
    for i, p in enumerate(vocab.pieces):
        kind = BYTE if sp.is_byte(i) else CONTROL if sp.is_control(i) else UNKNOWN if sp.is_unknown(i) else NORMAL
        assert (p.piece, p.score, p.kind) == (sp.id_to_piece(i), sp.get_score(i), kind)
    assert vocab.add_dummy_prefix and vocab.remove_extra_whitespaces


def test_encode_matches_run_c_prompt_ids(tokenizers_by_source, greedy_cases):
    for tok in tokenizers_by_source.values():
        for case in greedy_cases.values():
            assert tok.encode(case["prompt"]).ids == case["derived_prompt_token_ids"]
        assert tok.encode("Once upon a time").ids == [1, 403, 407, 261, 378]
        assert tok.encode("").ids == [1]  # as run.c: an empty prompt is BOS alone


def test_decode_reproduces_published_text(tokenizers_by_source, greedy_cases):
    tok = tokenizers_by_source["tok512.bin"]
    for case in greedy_cases.values():
        ids = case["derived_sequence_token_ids"]
        assert tok.decode(ids[1:]) == case["text"]
        assert tok.decode(ids, skip_special_tokens=True) == case["text"]


def test_ids_equal_sentencepiece_on_tinystories(tokenizers_by_source):
    spm = pytest.importorskip("sentencepiece")
    if not VALID.is_file():
        pytest.skip(f"{VALID} absent")
    sp = spm.SentencePieceProcessor(model_file=str(STORIES / "tok512.model"))
    lines = VALID.read_text().split("\n") + TRICKY
    assert len(lines) > 500
    tok = tokenizers_by_source["tok512.model"]
    for line in lines:
        assert tok.encode(line, add_special_tokens=False).ids == sp.encode(line), repr(line)
    for line in lines[:50] + TRICKY:  # decoding round-trips what SentencePiece keeps of the text
        assert tok.decode(tok.encode(line).ids, skip_special_tokens=True) == sp.decode(sp.encode(line))


def test_special_tokens_in_text_are_special(tokenizers_by_source):
    # HF convention (unlike sentencepiece, which spells them out): literal "<s>" / "</s>" become BOS / EOS
    tok = tokenizers_by_source["tok512.bin"]
    assert tok.encode("<s> x </s><unk>", add_special_tokens=False).ids == [1, 410, 444, 2, 0]


def test_truncated_tokenizer_bin_is_one_line_error(tmp_path):
    raw = (STORIES / "tok512.bin").read_bytes()
    bad = tmp_path / "tok.bin"
    bad.write_bytes(raw[:-3])
    with pytest.raises(WeightsError, match=r"tok\.bin: truncated llama2\.c tokenizer at piece 511"):
        read_sp_vocab(bad)
    with pytest.raises(WeightsError, match="tokenizer file not found"):
        read_sp_vocab(tmp_path / "missing.model")


def test_short_vocab_reads_its_pieces(tmp_path):
    raw = (STORIES / "tok512.bin").read_bytes()
    pos = 4
    for _ in range(300):
        pos += 8 + struct.unpack_from("<i", raw, pos + 4)[0]
    short = tmp_path / "tok300.bin"
    short.write_bytes(raw[:pos])
    assert len(read_sp_vocab(short).pieces) == 300
