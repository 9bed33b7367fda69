"""Perplexity and bits per byte: a sliding window over one text, or per document (split on a separator)."""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from strata.layers.attention import AttentionMetadata
from strata.models.base import CausalLM
from strata.tokenizer import Tokenizer

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class PerplexityResult:
    nll_nats: float  # summed over scored tokens
    tokens: int
    bytes: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_nats / max(self.tokens, 1))

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / math.log(2) / max(self.bytes, 1)

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "bits_per_byte": self.bits_per_byte, "tokens": self.tokens, "bytes": self.bytes,
                "nll_nats": self.nll_nats}


def token_num_bytes(tokenizer: Tokenizer, token_id: int, prev_id: int | None = None) -> int:
    """UTF-8 bytes a token piece stands for (SentencePiece ▁ = space, <0xNN> = 1 byte, byte-level = 1 per char).

    As llama2.c's decoder does, a SentencePiece piece right after BOS loses its leading (dummy-prefix) space.
    """
    piece = tokenizer.id_to_token(token_id) or ""
    if _BYTE_PIECE.match(piece):
        return 1
    if tokenizer.is_byte_level:
        return len(piece)
    text = piece.replace("\u2581", " ")
    if prev_id is not None and prev_id == tokenizer.bos_token_id and text.startswith(" "):
        text = text[1:]
    return len(text.encode("utf-8"))


def _bytes(tok: Tokenizer, window: list[int], first: int) -> int:
    return sum(token_num_bytes(tok, window[i], window[i - 1]) for i in range(first, len(window)))


@torch.inference_mode()
def scored_logits(model: CausalLM, windows: list[list[int]], score_from: list[int]) -> list[torch.Tensor]:
    """Forward several windows in one batch; per window the logits [n, V] that predict w[s:]."""
    ids = torch.tensor([t for w in windows for t in w], dtype=torch.long)
    positions = torch.cat([torch.arange(len(w)) for w in windows])
    logits = model(ids, positions, AttentionMetadata.no_cache([len(w) for w in windows]))  # [T, V]
    out, start = [], 0
    for w, s in zip(windows, score_from):
        out.append(logits[start + s - 1 : start + len(w) - 1])  # [len(w) - s, V]
        start += len(w)
    return out


def _nll(model: CausalLM, windows: list[list[int]], score_from: list[int]) -> tuple[float, list[list[int]]]:
    """Summed NLL of several windows (one batch) and the scored target ids per window."""
    total, scored = 0.0, []
    for w, s, pred in zip(windows, score_from, scored_logits(model, windows, score_from)):
        total += float(F.cross_entropy(pred.float(), torch.tensor(w[s:], dtype=torch.long), reduction="sum"))
        scored.append(w[s:])
    return total, scored


def window_spans(num_ids: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over num_ids tokens as (begin, end, score_from): every token after the first is scored
    exactly once, each with as much left context as the window allows."""
    spans, prev_end = [], 1  # position 0 (BOS or first token) is never predicted
    for begin in range(0, max(num_ids - 1, 1), stride):
        begin = min(begin, prev_end - 1)  # the window must hold the token before the first one it scores
        end = min(begin + context, num_ids)
        if end <= prev_end:
            continue
        spans.append((begin, end, prev_end - begin))
        prev_end = end
        if end == num_ids:
            break
    return spans


def document_windows(tok: Tokenizer, text: str, separator: str, max_positions: int) -> list[list[int]]:
    """Each document encoded with BOS and cut to max_positions predicted tokens; empty ones dropped."""
    docs = [d.strip() for d in text.split(separator) if d.strip()]
    windows = [tok.encode(d)[: max_positions + 1] for d in docs]
    return [w for w in windows if len(w) > 1]


def sliding_window(model: CausalLM, tok: Tokenizer, text: str, context: int, stride: int,
                   progress: bool = True) -> PerplexityResult:
    ids = tok.encode(text)
    nll, n_tok, n_bytes = 0.0, 0, 0
    spans = window_spans(len(ids), context, stride)
    for begin, end, first in tqdm(spans, desc="ppl", disable=not progress, file=sys.stderr, leave=False):
        window = ids[begin:end]
        total, scored = _nll(model, [window], [first])
        nll += total
        n_tok += len(scored[0])
        n_bytes += _bytes(tok, window, first)
    return PerplexityResult(nll, n_tok, n_bytes)


def per_document(model: CausalLM, tok: Tokenizer, text: str, separator: str, max_positions: int,
                 batch: int = 8, progress: bool = True) -> PerplexityResult:
    """Each document encoded with BOS, at most `max_positions` predicted tokens (tinyllamas-style BPB)."""
    windows = document_windows(tok, text, separator, max_positions)
    nll, n_tok, n_bytes = 0.0, 0, 0
    for i in tqdm(range(0, len(windows), batch), desc="ppl", disable=not progress, file=sys.stderr, leave=False):
        chunk = windows[i : i + batch]
        total, scored = _nll(model, chunk, [1] * len(chunk))
        nll += total
        n_tok += sum(len(s) for s in scored)
        n_bytes += sum(_bytes(tok, w, 1) for w in chunk)
    return PerplexityResult(nll, n_tok, n_bytes)
