"""The tokenizer a GGUF file describes in its metadata, as a `tokenizers` tokenizer.json + tokenizer_config.json.

GGUF keeps the vocabulary (`tokenizer.ggml.tokens`), the merges or the piece scores, the token types and
the special token ids, under llama.cpp's key names. Two vocabulary kinds are rebuilt here:

- `gpt2`: byte-level BPE (SmolLM2, Qwen, Llama 3). The split regex follows `tokenizer.ggml.pre` for the
  families whose regex differs from GPT-2's; any other value keeps GPT-2's.
- `llama`: SentencePiece BPE with byte fallback (Llama 2, Mistral, TinyLlama). Files without merges get
  them from the piece scores, best first.

Tokens typed CONTROL become special added tokens and USER_DEFINED ones plain added tokens, so text such as
`<|im_start|>` stays one token. The encodings equal transformers' GGUF tokenizer on the same file.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from strata.errors import UnsupportedError, WeightsError
from strata.weights.gguf_reader import GGUFFile

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
SPACE = "\u2581"  # SentencePiece's escaped space

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre values whose merges were learned on text split by a regex other than GPT-2's
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
}
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the rest above 255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level(g: GGUFFile, tokens: list[str]) -> Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # a few converters store some tokens as raw text; respell those in the byte alphabet
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")), i)
    merges = _file_merges(g)
    if merges is None:
        raise WeightsError(f"{g.path}: metadata field 'tokenizer.ggml.merges' missing (needed by a gpt2 vocabulary)")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(g.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(g: GGUFFile, tokens: list[str]) -> Tokenizer:
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = _file_merges(g)
    if merges is None:
        scores = g.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise WeightsError(f"{g.path}: a llama (SentencePiece) vocabulary needs 'tokenizer.ggml.merges' or one "
                               f"'tokenizer.ggml.scores' entry per token")
        merges = merges_from_scores(vocab, dict(zip(tokens, (float(s) for s in scores))))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    add_prefix = bool(g.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first" if add_prefix else "never",
                                                 split=False)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces of the vocabulary, the best-scoring merged piece first.

    Ties go to the longer left part, then the longer right part, then vocabulary order: the order
    transformers uses, so both produce the same encodings.
    """
    ranked = []
    for piece, score in scores.items():
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked.extend((-score, -len(left), -len(right), left, right) for left, right in local)
    ranked.sort(key=lambda r: r[:3])  # stable: equal keys keep the order above
    return [(left, right) for *_, left, right in ranked]


def _file_merges(g: GGUFFile) -> list[tuple[str, str]] | None:
    merges = g.get("tokenizer.ggml.merges")
    if merges is None:
        return None
    out = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise WeightsError(f"{g.path}: 'tokenizer.ggml.merges' entry {m!r} is not two tokens separated by a space")
        out.append((parts[0], parts[1]))
    return out


def _special_token(g: GGUFFile, tokens: list[str], key: str) -> str | None:
    i = g.get(f"tokenizer.ggml.{key}")
    if i is None:
        return None
    if not 0 <= int(i) < len(tokens):
        raise WeightsError(f"{g.path}: 'tokenizer.ggml.{key}' is {i}, outside the vocabulary of {len(tokens)} tokens")
    return tokens[int(i)]


def build_tokenizer(g: GGUFFile) -> tuple[Tokenizer, dict]:
    """(tokenizer, tokenizer_config.json dict) from the file's metadata."""
    tokens = g.get("tokenizer.ggml.tokens")
    kind = g.get("tokenizer.ggml.model")
    if tokens is None or kind is None:
        raise WeightsError(f"{g.path}: no tokenizer in the metadata ('tokenizer.ggml.model' / 'tokenizer.ggml.tokens')")
    if kind == "gpt2":
        tok = _byte_level(g, tokens)
    elif kind == "llama":
        tok = _sentencepiece(g, tokens)
    else:
        raise UnsupportedError(f"{g.path}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, llama)")
    specials = {name: _special_token(g, tokens, key) for name, key in _SPECIAL_IDS.items()}
    types = g.get("tokenizer.ggml.token_type") or []
    alphabet = set(bytes_to_unicode().values()) if kind == "gpt2" else None
    special = [t for t, ty in zip(tokens, types) if ty == CONTROL and (alphabet is None or set(t) <= alphabet)]
    special += [t for t in specials.values() if t is not None and t not in special]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    add_bos = bool(g.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(g.get("tokenizer.ggml.add_eos_token", False))
    bos = specials["bos_token"] if add_bos else None
    eos = specials["eos_token"] if add_eos else None
    single = [t for t in (bos, "$A", eos) if t]
    pair = single + [t for t in (bos, "$B:1", eos) if t]
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, tok.token_to_id(t)) for t in {bos, eos} if t])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: v for k, v in specials.items() if v is not None},
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    template = g.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    return tok, config
