"""How far a model's next-token distributions are from a reference model's (`strata eval kl`).

Both models see exactly the windows `strata eval ppl` scores (sliding windows, or one window per document),
and at every scored position we accumulate KL(reference || candidate) in nats, whether the two top-1 tokens
agree, and both models' NLL of the true next token. Several candidates share one reference forward, so a
benchmark over many quantization formats runs the reference once.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from strata.eval.perplexity import _bytes, document_windows, scored_logits, window_spans
from strata.models.base import CausalLM
from strata.tokenizer import Tokenizer


@dataclass
class CompareResult:
    kl_nats: float = 0.0  # KL(reference || candidate), summed over scored tokens
    top1_agree: int = 0  # positions where both argmaxes are the same token
    nll_nats: float = 0.0  # candidate's NLL of the true next tokens, summed
    ref_nll_nats: float = 0.0
    tokens: int = 0
    bytes: int = 0

    def to_dict(self) -> dict:
        n = max(self.tokens, 1)
        bits = math.log(2) * max(self.bytes, 1)
        return {"kl": self.kl_nats / n, "top1_agreement": self.top1_agree / n, "tokens": self.tokens,
                "bytes": self.bytes, "ppl": math.exp(self.nll_nats / n), "bits_per_byte": self.nll_nats / bits,
                "ref_ppl": math.exp(self.ref_nll_nats / n), "ref_bits_per_byte": self.ref_nll_nats / bits}


def token_stats(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int, float]:
    """[N, V] reference logits, [N, V] candidate logits, [N] true ids -> (summed KL, top-1 agreements, NLL)."""
    ref_lp = F.log_softmax(ref_logits.float(), dim=-1)  # [N, V]
    lp = F.log_softmax(logits.float(), dim=-1)  # [N, V]
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0)  # [N]; rounding can make a tiny KL negative
    agree = int((ref_lp.argmax(-1) == lp.argmax(-1)).sum())
    nll = float(F.nll_loss(lp, targets, reduction="sum"))
    return float(kl.sum()), agree, nll


def _batches(tok: Tokenizer, text: str, context: int, stride: int, split: str | None, max_positions: int,
             batch: int) -> list[tuple[list[list[int]], list[int]]]:
    if split:
        windows = document_windows(tok, text, split, max_positions)
        return [(windows[i : i + batch], [1] * len(windows[i : i + batch])) for i in range(0, len(windows), batch)]
    ids = tok.encode(text)
    return [([ids[b:e]], [s]) for b, e, s in window_spans(len(ids), context, stride)]


@torch.inference_mode()
def compare_models(reference: CausalLM, candidates: dict[str, CausalLM], tok: Tokenizer, text: str,
                   context: int = 512, stride: int | None = None, split: str | None = None,
                   max_positions: int = 128, batch: int = 8, progress: bool = True) -> dict[str, CompareResult]:
    """{name: candidate} -> {name: CompareResult} over the windows `strata eval ppl` would score."""
    results = {name: CompareResult() for name in candidates}
    batches = _batches(tok, text, context, stride or context // 2, split, max_positions, batch)
    for windows, score_from in tqdm(batches, desc="kl", disable=not progress, file=sys.stderr, leave=False):
        targets = [torch.tensor(w[s:], dtype=torch.long) for w, s in zip(windows, score_from)]
        n_bytes = sum(_bytes(tok, w, s) for w, s in zip(windows, score_from))
        refs = scored_logits(reference, windows, score_from)
        ref_nll = sum(float(F.cross_entropy(r.float(), t, reduction="sum")) for r, t in zip(refs, targets))
        for name, model in candidates.items():
            res = results[name]
            for r, c, t in zip(refs, scored_logits(model, windows, score_from), targets):
                kl, agree, nll = token_stats(r, c, t)
                res.kl_nats += kl
                res.top1_agree += agree
                res.nll_nats += nll
                res.tokens += len(t)
            res.ref_nll_nats += ref_nll
            res.bytes += n_bytes
    return results
