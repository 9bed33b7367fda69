"""Sampler: logits processors (bias, penalties, min_tokens) then greedy or temperature/top-k/top-p/min-p
sampling with the sequence's own generator (so a seed reproduces whatever the batch).

The batch is sampled at once: processors run only on the rows that need them, then temperature, top-k, min-p
and top-p apply to all sampled rows as [N, V] tensor operations with per-row parameters. Top-k and top-p find
each row's boundary by a radix select in native code (strata/layers/cpu_sample.c) instead of sorting: torch's
sort of 16 rows of a 49k vocabulary takes 50 ms on one core. A sampled row draws by inverse CDF: one uniform u
in [0, 1) from the row's own generator (the global one without a seed) and the first token whose cumulative
weight exceeds u times the row's total. That takes one random number per row where torch.multinomial's Exp(1)
noise takes one per vocabulary entry (benchmarks/sampler_draw.py), and gives each row the same token whatever
else is in the batch. Temperature and softmax run as one native call too (three passes over each row where
torch's division and softmax make five). Without the native kernels the same rules run as torch operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strata.engine.sampling_params import SamplingParams
from strata.engine.sequence import Sequence
from strata.errors import WeightsError
from strata.layers.quant_native import native_lib


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
    if seq.params.is_greedy:
        return int(torch.argmax(logits))
    return int(draw(sampling_probs(logits, seq.params)[None], [seq])[0])


def sampling_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [..., V] (processed) -> the weights sampling draws from [..., V] after temperature, top-k, min-p
    and top-p (speculative decoding's rejection sampler needs them whole)."""
    rows = logits.reshape(-1, logits.shape[-1])  # [R, V]
    return batch_sampling_probs(rows, [p] * rows.shape[0]).reshape(logits.shape)


def token_logprobs(logits: torch.Tensor, token: int, top_n: int) -> dict:
    """Log-probabilities under the model's raw distribution (as vLLM reports them); rank is 1 for the argmax."""
    return tokens_logprobs(logits[None], [token], top_n)[0]


def tokens_logprobs(logits: torch.Tensor, tokens: list[int], top_n: int) -> list[dict]:
    """logits [k, V], the k tokens that followed -> one logprob entry per row (prompt logprobs use this)."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [k, V]
    idx = torch.tensor(tokens, dtype=torch.long)[:, None]  # [k, 1]
    chosen = lp.gather(1, idx)  # [k, 1]
    ranks = (lp > chosen).sum(dim=1) + 1  # [k]
    out = [{"token_id": t, "logprob": float(c), "rank": int(r), "top": []}
           for t, c, r in zip(tokens, chosen[:, 0].tolist(), ranks.tolist())]
    if top_n:
        vals, ids = torch.topk(lp, top_n, dim=-1)  # [k, top_n]
        for entry, v_row, i_row in zip(out, vals.tolist(), ids.tolist()):
            entry["top"] = list(zip(i_row, v_row))
    return out


def needs_processing(seq: Sequence) -> bool:
    """Whether process_logits changes this sequence's logits (bias, penalties, or EOS held back by min_tokens)."""
    p = seq.params
    return bool(p.logit_bias or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
                or seq.num_completion_tokens < p.min_tokens)


def batch_sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [N, V] (processed) -> sampling weights [N, V]: sampling_probs with each row's own parameters,
    computed for all rows at once (the same values row by row)."""
    vocab = logits.shape[1]
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)  # [N]
    ks = [p.top_k if p.top_k and 0 < p.top_k < vocab else 0 for p in params]
    probs = None if any(ks) else _native_softmax(logits, temps)  # temperature and softmax in one native call
    if probs is None:
        logits = logits / temps[:, None]
        if any(ks) and not _native_select(logits, 0, ks, float("-inf")):  # torch without the native select
            rows = [i for i, k in enumerate(ks) if k]
            sub = logits[rows]  # [R, V]
            top = torch.topk(sub, max(ks), dim=-1).values  # [R, kmax]
            kth = top.gather(1, torch.tensor([ks[i] - 1 for i in rows])[:, None])  # [R, 1] each row's k-th largest
            logits[rows] = sub.masked_fill(sub < kth, float("-inf"))
        probs = _native_softmax(logits, None)
        if probs is None:
            probs = torch.softmax(logits, dim=-1)  # [N, V]
    min_ps = [p.min_p for p in params]
    if any(m > 0 for m in min_ps):
        cut = torch.tensor(min_ps, dtype=probs.dtype)[:, None] * probs.amax(-1, keepdim=True)  # [N, 1]
        probs = probs.masked_fill(probs < cut, 0.0)
    rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if rows and not _native_select(probs, 1, [p.top_p for p in params], 0.0):
        sub = probs[rows]  # [R, V]
        sorted_probs, order = torch.sort(sub, dim=-1, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        top_p = torch.tensor([params[i].top_p for i in rows], dtype=probs.dtype)[:, None]  # [R, 1]
        sorted_probs = sorted_probs.masked_fill((cum - sorted_probs) > top_p, 0.0)
        probs[rows] = torch.zeros_like(sub).scatter_(-1, order, sorted_probs)
    return probs  # top-p leaves rows unnormalized; the draw does not mind


def _native_softmax(x: torch.Tensor, temps: torch.Tensor | None) -> torch.Tensor | None:
    """softmax(x / temps[:, None], dim=-1) for x [N, V] (temps None: no division) through the native kernel
    (cpu_sample.c: one call, three passes over each row), or None when it cannot take x."""
    lib = native_lib()
    if lib is None or x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous():
        return None
    out = torch.empty_like(x)  # [N, V]
    lib.softmax_rows_f32(x.data_ptr(), x.shape[0], x.shape[1], None if temps is None else temps.data_ptr(),
                         out.data_ptr())
    return out


def _native_select(x: torch.Tensor, mode: int, params: list[float], fill: float) -> bool:
    """Top-k (mode 0, params = k per row, 0 for none) or top-p (mode 1, params = top_p per row) on x [N, V] in
    place through the native radix select (cpu_sample.c: the same kept entries as a sort, without sorting);
    False when the native kernels are not here."""
    lib = native_lib()
    if lib is None or x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous():
        return False
    par = torch.tensor(params, dtype=torch.float64)  # [N]
    if lib.select_rows_f32(x.data_ptr(), x.shape[0], x.shape[1], mode, par.data_ptr(), fill) != 0:
        raise MemoryError("sampling: no scratch memory for the top-k/top-p select")
    return True


DRAW_BLOCK = 256  # vocabulary entries summed together before the draw walks into one block


def draw(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """probs [N, V] (unnormalized weights) -> one token per row [N]: the first token whose cumulative weight
    exceeds u x the row's total, u uniform in [0, 1) from the row's generator; the unseeded rows take theirs
    in one call on the global generator, in batch order. The cumulative weights are float64 sums of blocks of
    DRAW_BLOCK entries, then running sums inside the one block the target falls in (a cumulative sum over the
    whole vocabulary writes N x V doubles per step): in native code (cpu_sample.c's draw_rows_f32) for
    contiguous float32 rows, else as torch operations."""
    n, vocab = probs.shape
    u = torch.empty(n, 1, dtype=torch.float64)  # [N, 1]
    unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), 1, dtype=torch.float64)
    for i, seq in enumerate(seqs):
        if seq.generator is not None:
            u[i] = torch.rand(1, dtype=torch.float64, generator=seq.generator)
    lib = native_lib()
    if lib is not None and probs.dtype == torch.float32 and probs.is_contiguous():
        tokens = torch.empty(n, dtype=torch.int64)  # [N]
        failed = lib.draw_rows_f32(probs.data_ptr(), n, vocab, u.data_ptr(), tokens.data_ptr())
        if failed == -2:
            raise MemoryError("sampling: no scratch memory for the draw")
        if failed >= 0:
            raise ValueError("invalid sampling distribution (negative weights or all zero)")
        return tokens
    return _draw_torch(probs, u)


def _draw_torch(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """draw's torch operations, for rows the native draw does not take: probs [N, V], u [N, 1] float64 -> [N]."""
    n, vocab = probs.shape
    w = F.pad(probs, (0, -vocab % DRAW_BLOCK)).reshape(n, -1, DRAW_BLOCK)  # [N, B, DRAW_BLOCK]
    cum = w.sum(-1, dtype=torch.float64).cumsum(-1)  # [N, B] weight up to each block's end
    if not bool(probs.min() >= 0) or not bool((cum[:, -1] > 0).all()):
        raise ValueError("invalid sampling distribution (negative weights or all zero)")
    target = u * cum[:, -1:]  # [N, 1]
    block = torch.searchsorted(cum, target, right=True).clamp_(max=cum.shape[1] - 1)  # [N, 1]
    start = torch.where(block > 0, cum.gather(1, (block - 1).clamp(min=0)), 0.0)  # [N, 1]
    inner = start + w[torch.arange(n), block[:, 0]].cumsum(-1, dtype=torch.float64)  # [N, DRAW_BLOCK]
    offset = torch.searchsorted(inner, target, right=True).clamp_(max=DRAW_BLOCK - 1)  # [N, 1]
    tokens = (block * DRAW_BLOCK + offset).clamp_(max=vocab - 1)  # [N, 1]
    zero = probs.gather(1, tokens)[:, 0] <= 0  # u x total rounded up to the total: past the last weight
    if bool(zero.any()):
        last = vocab - 1 - torch.argmax((probs[zero] > 0).flip(-1).to(torch.int8), dim=-1)  # [Z]
        tokens[zero, 0] = last
    return tokens[:, 0]  # [N]


def argmax_rows(logits: torch.Tensor, finite_check: bool = False) -> list[int]:
    """torch.argmax(logits, dim=-1).tolist() for logits [N, V]: fp32 rows through the native scan
    (cpu_argmax.c; torch's reduction runs a scalar loop per row, 20 µs for 16 rows of a 2k vocabulary).
    finite_check: check_finite_logits in the same pass (the scan looks for NaN/inf as it goes)."""
    lib = native_lib()
    if lib is None or logits.dtype != torch.float32 or logits.dim() != 2 or not logits.is_contiguous():
        if finite_check:
            check_finite_logits(logits)
        return torch.argmax(logits, dim=-1).tolist()
    out = torch.empty(logits.shape[0], dtype=torch.int64)  # [N]
    if lib.argmax_rows_f32(logits.data_ptr(), logits.shape[0], logits.shape[1], int(finite_check),
                           out.data_ptr()) >= 0:
        raise WeightsError(NONFINITE_LOGITS)
    return out.tolist()


NONFINITE_LOGITS = ("the model computed NaN/inf logits (corrupt weights, or an overflow in the forward?); "
                    "nothing was sampled")


def check_finite_logits(logits: torch.Tensor) -> None:
    """argmax/multinomial would turn NaN into an arbitrary token: refuse instead."""
    # one reduction first: a finite sum means every logit is finite (it would take logits near 1e34 to overflow
    # it, and then the element-wise check below decides)
    if not torch.isfinite(logits.sum()) and not torch.isfinite(logits).all():
        raise WeightsError(NONFINITE_LOGITS)


class Sampler:
    def __init__(self, eos_token_ids: list[int], structured=None):
        self.eos_token_ids = list(eos_token_ids)
        self.structured = structured  # StructuredOutputManager: grammar masks (strata/engine/guided.py)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits [N, V] float32, one row per sequence -> sampled token per sequence."""
        structured = self.structured is not None and self.structured.has_any(seqs)
        plain_greedy = all(
            s.params.is_greedy and s.params.logprobs is None and not needs_processing(s) for s in seqs
        )
        if plain_greedy and not structured:
            return argmax_rows(logits, finite_check=True)  # NaN/inf refused in the same pass
        check_finite_logits(logits)
        masked = logits  # what is sampled from; logprobs stay those of the model's raw distribution
        if structured:
            masked = self.structured.apply(logits, seqs)
        if plain_greedy:
            return argmax_rows(masked)
        processed = masked
        todo = [i for i, s in enumerate(seqs) if needs_processing(s)]
        if todo:
            processed = masked.clone()
            for i in todo:
                processed[i] = process_logits(masked[i], seqs[i], self.eos_token_ids)
        rows = [i for i, s in enumerate(seqs) if not s.params.is_greedy]
        if len(rows) == len(seqs):  # every row samples: no argmax, no row gathers
            tokens = draw(batch_sampling_probs(processed, [s.params for s in seqs]), seqs).tolist()
        else:
            tokens = torch.argmax(processed, dim=-1)  # [N]; greedy rows keep it
            if rows:
                probs = batch_sampling_probs(processed[rows], [seqs[i].params for i in rows])  # [R, V]
                tokens[rows] = draw(probs, [seqs[i] for i in rows])
            tokens = tokens.tolist()
        for i, seq in enumerate(seqs):
            if seq.params.logprobs is not None:
                seq.logprobs.append(token_logprobs(logits[i], tokens[i], seq.params.logprobs))
        return tokens


class IsolatingSampler:
    """Wraps a sampler: when a batch fails, re-samples row by row and records which requests raised
    (`failed`), so that the caller fails those alone and the others go on."""

    def __init__(self, inner, placeholder_token: int):
        self.inner = inner
        self.placeholder = placeholder_token
        self.failed: dict[str, Exception] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, logits, seqs):
        marks = [len(s.logprobs) for s in seqs]
        try:
            return self.inner(logits, seqs)
        except Exception:  # noqa: BLE001 - find the culprit row below
            tokens = []
            for i, seq in enumerate(seqs):
                del seq.logprobs[marks[i]:]  # rows sampled before the failure appended once already
                try:
                    tokens.extend(self.inner(logits[i : i + 1], [seq]))
                except Exception as e:  # noqa: BLE001
                    self.failed[seq.request_id] = e
                    tokens.append(self.placeholder)
            return tokens
