"""Sampler: logits processors (bias, penalties, min_tokens) then greedy or temperature/top-k/top-p/min-p
sampling with the sequence's own generator (so a seed reproduces whatever the batch)."""

from __future__ import annotations

import torch

from strata.engine.sequence import Sequence


def _penalize(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)  # prompt and output, as HF/vLLM
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.num_completion_tokens:
        out = torch.tensor(seq.completion_token_ids, dtype=torch.long)
        counts = torch.bincount(out, minlength=logits.shape[0]).to(logits.dtype)  # [V]
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def process_logits(logits: torch.Tensor, seq: Sequence, eos_token_ids: list[int]) -> torch.Tensor:
    """logits [V] float32 -> processed logits [V] (a copy)."""
    p = seq.params
    logits = logits.clone()
    if p.logit_bias:
        for tok, bias in p.logit_bias.items():
            if 0 <= int(tok) < logits.shape[0]:
                logits[int(tok)] += bias
    logits = _penalize(logits, seq)
    if seq.num_completion_tokens < p.min_tokens:
        banned = [t for t in (list(p.stop_token_ids) + ([] if p.ignore_eos else eos_token_ids)) if t < logits.shape[0]]
        if banned:
            logits[banned] = float("-inf")
    return logits


def sample_token(logits: torch.Tensor, seq: Sequence) -> int:
    """logits [V] (processed) -> token id."""
    p = seq.params
    if p.is_greedy:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if p.top_k and p.top_k > 0 and p.top_k < logits.shape[0]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        drop = (cum - sorted_probs) > p.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=seq.generator))


def token_logprobs(logits: torch.Tensor, token: int, top_n: int) -> dict:
    """Log-probabilities under the model's raw distribution (as vLLM reports them)."""
    lp = torch.log_softmax(logits, dim=-1)
    out = {"token_id": token, "logprob": float(lp[token]), "top": []}
    if top_n:
        vals, ids = torch.topk(lp, top_n)
        out["top"] = [(int(i), float(v)) for i, v in zip(ids, vals)]
    return out


class Sampler:
    def __init__(self, eos_token_ids: list[int], structured=None):
        self.eos_token_ids = list(eos_token_ids)
        self.structured = structured  # StructuredOutputManager: grammar masks (strata/engine/guided.py)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits [N, V] float32, one row per sequence -> sampled token per sequence."""
        masked = logits  # what is sampled from; logprobs stay those of the model's raw distribution
        if self.structured is not None and self.structured.has_any(seqs):
            masked = self.structured.apply(logits, seqs)
        plain_greedy = all(
            s.params.is_greedy and not s.params.logit_bias and s.params.repetition_penalty == 1.0
            and not s.params.presence_penalty and not s.params.frequency_penalty
            and s.num_completion_tokens >= s.params.min_tokens and s.params.logprobs is None
            for s in seqs
        )
        if plain_greedy:
            return torch.argmax(masked, dim=-1).tolist()
        tokens = []
        for row, mrow, seq in zip(logits, masked, seqs):
            tok = sample_token(process_logits(mrow, seq, self.eos_token_ids), seq)
            if seq.params.logprobs is not None:
                seq.logprobs.append(token_logprobs(row, tok, seq.params.logprobs))
            tokens.append(tok)
        return tokens
