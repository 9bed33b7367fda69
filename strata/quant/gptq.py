"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the columns not yet
quantized, so that the *output* error E||(W - Q) x||^2 = tr((W - Q) H (W - Q)^T) is small, not the weight error.

H = E[x x^T] [in, in] comes from calibration (strata.eval.calibration, `<module>.input_second_moment`).
With the upper Cholesky factor U of H^-1, quantizing column i with error e_i = (w_i - q_i) / U_ii and
updating the later columns w_j -= e_i U_ij (j > i) is the optimal linear correction (Frantar et al., 2022).
Updates are applied lazily per block of columns, as the paper does, so most of the work is one matmul.

Columns go in decreasing H_jj order ("act order"), so group scales are chosen up front with search.py's
clip search weighted by diag H (in natural order they are chosen when a group's first column comes up,
from the corrected weights). After the pass, each row's scales are refit by least squares on the output
error for the chosen codes (refit_scales). The output is the same codes and stored scales format.py
packs: the on-disk format does not change.
"""

from __future__ import annotations

import torch

from strata.quant.search import choose_scales, code_values, round_codes, safe_divisor

DAMP = 0.01  # added to the diagonal, as a share of its mean: H from few tokens is singular
BLOCK = 128  # columns per lazy update
ACT_ORDER = True  # measured on stories260K int4-g64: +6.5% ppl vs +7.2% in natural order


def _prepare(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded, damped H (float64) and W with dead input columns (H_jj = 0, input always zero) zeroed."""
    kp = w.shape[1]
    hp = torch.zeros(kp, kp, dtype=torch.float64)
    k = h.shape[0]
    hp[:k, :k] = h.double()
    diag = hp.diagonal()
    dead = diag <= 0
    w = w.clone()
    w[:, dead] = 0
    mean = diag[~dead].mean() if (~dead).any() else torch.tensor(1.0, dtype=torch.float64)
    hp[dead, dead] = mean  # padded and dead columns: any positive value keeps H invertible
    hp += DAMP * mean * torch.eye(kp, dtype=torch.float64)
    return w, hp


def gptq_codes(wg: torch.Tensor, fmt, hessian: torch.Tensor, act_order: bool = ACT_ORDER):
    """wg [out, ng, G] fp32 (format._grouped) and H [in, in] -> (codes [out, ng, G], scales, zeros).

    act_order: quantize columns by decreasing H_jj (the inputs with most energy first, while the most
    columns are left to absorb their error); group scales are then chosen up front on the original
    weights, since a group's columns are no longer visited together.
    """
    out, ng, g = wg.shape
    w, h = _prepare(wg.reshape(out, ng * g), hessian)  # [out, Kp], [Kp, Kp]
    kp = w.shape[1]
    diag = h.diagonal().float()
    grouped = fmt.group_size is not None
    static = act_order or not grouped
    if static:  # every scale chosen now, on the original weights
        scales, zeros = choose_scales(w.view(out, -1, g if grouped else kp), fmt, "clip",
                                      diag.view(-1, g if grouped else kp))
    else:  # chosen when a group's first column comes up, on the corrected weights
        scales = torch.empty(out, ng, dtype=torch.float16)
        zeros = torch.empty(out, ng, dtype=torch.uint8) if fmt.asym else None
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(kp)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    u = torch.linalg.cholesky(hinv, upper=True).float()  # [Kp, Kp]
    group = (perm // g) if grouped else torch.zeros(kp, dtype=torch.long)  # group of each permuted column
    codes = torch.empty_like(w)
    block = g * max(1, BLOCK // g) if grouped else BLOCK
    for b0 in range(0, kp, block):
        b1 = min(b0 + block, kp)
        wb = w[:, b0:b1].clone()  # [out, B]
        err = torch.empty_like(wb)
        for i in range(b1 - b0):
            col, gi = b0 + i, int(group[b0 + i])
            if not static and col % g == 0:
                s, z = choose_scales(wb[:, None, i : i + g], fmt, "clip", diag[None, col : col + g])
                scales[:, gi] = s[:, 0]
                if zeros is not None:
                    zeros[:, gi] = z[:, 0]
            sf = (scales[:, gi] if grouped else scales).float()
            sf = safe_divisor(sf)[:, None]  # [out, 1]
            zf = None if zeros is None else zeros[:, gi].float()[:, None]
            q = round_codes(wb[:, i : i + 1], fmt, sf, zf)  # [out, 1]
            codes[:, col] = q[:, 0]
            e = (wb[:, i : i + 1] - code_values(q, sf, zf)) / u[col, col]  # [out, 1]
            wb[:, i:] -= e * u[col, col:b1][None, :]
            err[:, i] = e[:, 0]
        w[:, b1:] -= err @ u[b0:b1, b1:]  # lazy update of the remaining columns
    codes = codes[:, torch.argsort(perm)].view(out, -1, g if grouped else kp)  # original column order
    h = h[torch.argsort(perm)][:, torch.argsort(perm)]
    w0 = wg.reshape(out, -1)
    scales = refit_scales(w0, codes, scales, zeros, h, fmt)
    return codes.view(out, ng, g), scales, zeros


def _output_error(w, codes, s, z, h):  # [out] sum over rows of d H d^T, d = w - dequant
    sf = s.float().view(w.shape[0], -1, 1)
    zf = None if z is None else z.float()[..., None]
    d = (w - code_values(codes, sf, zf).reshape(w.shape)).double()  # [out, Kp]
    return ((d @ h) * d).sum(1)


def refit_scales(w, codes, s, z, h, fmt):
    """Per row, the scales that minimise the output error d H d^T for the codes GPTQ chose (a small
    least-squares system of one unknown per group); rows where the stored (rounded) result is not
    better keep their scales."""
    out, ng = codes.shape[0], codes.shape[1]
    q = (codes - z.float()[..., None] if z is not None else codes).double()  # [out, ng, G]
    hg = h.view(ng, q.shape[2], ng, q.shape[2])
    a = torch.einsum("rag,agbh,rbh->rab", q, hg, q)  # [out, ng, ng]
    b = (q * (w.double() @ h).view(out, ng, -1)).sum(-1)  # [out, ng]
    a = a + 1e-9 * a.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-30)[:, None, None] * torch.eye(ng)
    t = torch.linalg.solve(a, b[..., None])[..., 0]  # [out, ng]
    new = t.abs().to(s.dtype).view(s.shape) if fmt.group_size is not None else t[:, 0].abs().to(s.dtype)
    new = torch.where(torch.isfinite(new) & (t.view(new.shape) > 0), new, s)  # a sign flip would change codes
    better = _output_error(w, codes, new, z, h) < _output_error(w, codes, s, z, h)
    return torch.where(better.view(-1, *([1] * (s.dim() - 1))), new, s)
