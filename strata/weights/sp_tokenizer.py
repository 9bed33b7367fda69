"""SentencePiece-BPE vocabularies (llama2.c `tok*.bin` or SentencePiece `.model`) as HF `tokenizers` JSON.

Neither sentencepiece nor protobuf is needed: the `.model` is read with a tiny protobuf wire-format reader
(only the fields we use), and the tokenizer is rebuilt as a `tokenizers` BPE with byte fallback whose merges
are ordered by the score of the merged piece, as SentencePiece's BPE encoder picks the best-scoring pair.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

from strata.errors import UnsupportedError, WeightsError

# SentencePiece.Type enum values (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁", SentencePiece's escaped space
BPE_MODEL_TYPE = 2


@dataclass
class SpPiece:
    piece: str
    score: float
    kind: int = NORMAL


@dataclass
class SpVocab:
    """A SentencePiece-BPE vocabulary plus the normalizer flags that change how text is encoded."""

    pieces: list[SpPiece]
    source: str
    add_dummy_prefix: bool = True
    # llama2.c's train_vocab keeps SentencePiece's default (True): runs of spaces collapse, ends are stripped
    remove_extra_whitespaces: bool = True
    special_ids: dict[str, int] = field(default_factory=lambda: {"unk": 0, "bos": 1, "eos": 2})

    def token(self, name: str) -> str:
        return self.pieces[self.special_ids[name]].piece


# ---- protobuf wire format ----------------------------------------------------------------------
def _varint(buf: bytes, pos: int, source: str) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise WeightsError(f"{source}: truncated or corrupt protobuf varint at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, pos


def _fields(buf: bytes, source: str):
    """Yields (field_number, wire_type, value) where value is an int (varint/fixed) or bytes (length-delimited)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, source)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, source)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos, source)
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise WeightsError(f"{source}: not a SentencePiece model (protobuf wire type {wire} at byte {pos})")
        if pos > len(buf):
            raise WeightsError(f"{source}: truncated SentencePiece model (field {num} runs past the end)")
        yield num, wire, value


def read_sp_model(path: str | Path) -> SpVocab:
    """Reads ModelProto {pieces=1, trainer_spec=2, normalizer_spec=3} from a SentencePiece `.model` file."""
    source = str(path)
    buf = _read(path)
    pieces: list[SpPiece] = []
    vocab = SpVocab(pieces=pieces, source=source)
    for num, wire, value in _fields(buf, source):
        if num == 1 and wire == 2:  # SentencePiece {piece=1, score=2, type=3}
            piece, score, kind = "", 0.0, NORMAL
            for n, w, v in _fields(value, source):
                if n == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif n == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif n == 3 and w == 0:
                    kind = v
            pieces.append(SpPiece(piece, score, kind))
        elif num == 2 and wire == 2:  # TrainerSpec: model_type=3, unk_id=40, bos_id=41, eos_id=42
            for n, w, v in _fields(value, source):
                if n == 3 and w == 0 and v != BPE_MODEL_TYPE:
                    raise UnsupportedError(f"{source}: SentencePiece model_type {v} is not BPE (2)")
                if n in (40, 41, 42) and w == 0:
                    vocab.special_ids[{40: "unk", 41: "bos", 42: "eos"}[n]] = v
        elif num == 3 and wire == 2:  # NormalizerSpec: add_dummy_prefix=3, remove_extra_whitespaces=4
            for n, w, v in _fields(value, source):
                if n == 3 and w == 0:
                    vocab.add_dummy_prefix = bool(v)
                elif n == 4 and w == 0:
                    vocab.remove_extra_whitespaces = bool(v)
    if not pieces:
        raise WeightsError(f"{source}: not a SentencePiece model (expected repeated 'pieces', found none)")
    _check_specials(vocab)
    return vocab


def read_llama2c_tokenizer(path: str | Path) -> SpVocab:
    """Reads llama2.c's tokenizer export: int32 max_token_length, then per piece float32 score, int32 len, bytes.

    The export wrote ▁ as a space and BOS/EOS as "\\n<s>\\n" / "\\n</s>\\n"; both are undone here.
    """
    source = str(path)
    buf = _read(path)
    if len(buf) < 4:
        raise WeightsError(f"{source}: truncated llama2.c tokenizer (expected a 4-byte header, found {len(buf)} bytes)")
    pos, pieces = 4, []
    while pos < len(buf):
        if pos + 8 > len(buf):
            raise WeightsError(f"{source}: truncated llama2.c tokenizer at piece {len(pieces)} (byte {pos})")
        score, n = struct.unpack_from("<fi", buf, pos)
        pos += 8
        if n < 0 or pos + n > len(buf):
            raise WeightsError(f"{source}: truncated llama2.c tokenizer at piece {len(pieces)}: length {n}")
        text = buf[pos : pos + n].decode("utf-8")
        pos += n
        pieces.append(SpPiece(text.strip("\n") if text.startswith("\n<") else text.replace(" ", SPACE), score))
    vocab = SpVocab(pieces=pieces, source=source)
    for i, p in enumerate(pieces):  # the export drops piece types; recover them from the surface form
        if p.piece == "<unk>":
            p.kind = UNKNOWN
        elif p.piece in ("<s>", "</s>"):
            p.kind = CONTROL
        elif len(p.piece) == 6 and p.piece.startswith("<0x") and p.piece.endswith(">"):
            p.kind = BYTE
    _check_specials(vocab)
    return vocab


def read_sp_vocab(path: str | Path) -> SpVocab:
    """`.model` files are SentencePiece protobufs; anything else is read as a llama2.c tokenizer .bin."""
    return read_sp_model(path) if Path(path).suffix == ".model" else read_llama2c_tokenizer(path)


def _read(path: str | Path) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: tokenizer file not found")
    return p.read_bytes()


def _check_specials(vocab: SpVocab) -> None:
    want = {"unk": "<unk>", "bos": "<s>", "eos": "</s>"}
    for name, idx in vocab.special_ids.items():
        got = vocab.pieces[idx].piece if 0 <= idx < len(vocab.pieces) else None
        if got != want[name]:
            raise UnsupportedError(f"{vocab.source}: expected {want[name]!r} as {name} id {idx}, found {got!r}")


# ---- HF tokenizers -----------------------------------------------------------------------------
def bpe_merges(vocab: SpVocab) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, best-scoring merged piece first."""
    ids = {p.piece: i for i, p in enumerate(vocab.pieces) if p.kind in (NORMAL, USER_DEFINED)}
    ranked = []
    for piece, i in ids.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                ranked.append((-vocab.pieces[i].score, i, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer(vocab: SpVocab) -> Tokenizer:
    """A `tokenizers` BPE that encodes like SentencePiece does with this vocabulary (BOS added on encode)."""
    unk, bos, eos = vocab.token("unk"), vocab.token("bos"), vocab.token("eos")
    bpe = models.BPE(
        vocab={p.piece: i for i, p in enumerate(vocab.pieces)},
        merges=bpe_merges(vocab),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(bpe)
    steps = []
    if vocab.remove_extra_whitespaces:  # SentencePiece only treats the ASCII space as whitespace here
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A | \z"), "")]
    if vocab.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))  # Prepend leaves an empty string empty, like SentencePiece
    steps.append(normalizers.Replace(" ", SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (unk, bos, eos)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab.special_ids["bos"])]
    )
    return tok


def tokenizer_config(vocab: SpVocab, model_max_length: int) -> dict:
    """tokenizer_config.json that transformers' AutoTokenizer loads offline as the tokenizer.json above."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": vocab.token("bos"),
        "eos_token": vocab.token("eos"),
        "unk_token": vocab.token("unk"),
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
