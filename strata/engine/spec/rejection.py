"""Acceptance of drafted tokens: greedy (longest prefix matching the target's argmax) or rejection sampling.

Rejection sampling (Leviathan et al. 2023; Chen et al. 2023) keeps the output distribution the target's:
drafted token x_j, drawn from the proposal q_j, is accepted with probability min(1, p_j(x_j) / q_j(x_j));
at the first rejection the replacement is drawn from norm(max(0, p_j - q_j)); when all k are accepted a
bonus token is drawn from p_k. A deterministic proposer (prompt lookup) has q_j = one-hot(x_j): accept with
probability p_j(x_j), and on rejection draw from p_j with x_j removed. Either way each call returns the
accepted drafts plus one token, so a verification never produces fewer tokens than a plain decode step.
"""

from __future__ import annotations

import torch


def greedy_accept(target_ids: list[int], draft_ids: list[int]) -> list[int]:
    """target_ids: the target's argmax at the k + 1 scored positions -> accepted drafts + one token."""
    n = 0
    while n < len(draft_ids) and draft_ids[n] == target_ids[n]:
        n += 1
    return draft_ids[:n] + [target_ids[n]]


def rejection_sample(
    target_probs: torch.Tensor,  # [k + 1, V] the target's sampling distribution at each scored position
    draft_ids: list[int],  # k drafted tokens
    draft_probs: torch.Tensor | None,  # [k, V] the proposal each was drawn from; None = one-hot
    generator: torch.Generator | None = None,
) -> list[int]:
    """-> accepted drafts + one token (a replacement at the first rejection, else the bonus token)."""
    k = len(draft_ids)
    p = target_probs / target_probs.sum(-1, keepdim=True)  # [k + 1, V]
    ids = torch.tensor(draft_ids, dtype=torch.long)  # [k]
    rows = torch.arange(k)
    p_x = p[rows, ids]  # [k]
    q_x = draft_probs[rows, ids] if draft_probs is not None else torch.ones(k)  # [k]
    u = torch.rand(k, generator=generator, dtype=p.dtype)  # [k]
    accepted = u * q_x < p_x  # u < p/q without dividing; q_x > 0 because x was drawn from q
    n = int(accepted.long().cumprod(0).sum()) if k else 0
    if n == k:
        residual = p[k]
    else:
        q = draft_probs[n] if draft_probs is not None else torch.nn.functional.one_hot(ids[n], p.shape[-1])
        residual = (p[n] - q.to(p.dtype)).clamp_min(0)  # [V]
        if float(residual.sum()) <= 0:  # p == q up to rounding: rejection had probability ~0; p is exact
            residual = p[n]
    tok = int(torch.multinomial(residual, 1, generator=generator))
    return draft_ids[:n] + [tok]
