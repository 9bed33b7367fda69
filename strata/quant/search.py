"""How quantized scales (and int4 zero points) are chosen, and the rounding of weights onto a format's grid.

The on-disk layout is fixed by format.py; this file only decides *which* scale each row or group
gets. Three methods (quantize_weight's `method`; GPTQ in gptq.py builds on clip):

- `rtn`: absmax scales, round to nearest (int4 symmetric also tries the 16-level scale (signed max)/-8).
- `peak` (the default): only scales that put each group's largest-magnitude weight exactly on a level of the
  grid. int4 symmetric: that weight on -8 or on +-7 (as rtn); int4 asym: on level 0 or 15, with the zero
  point that just keeps the other end in range or the next one (which clips that smaller end a little);
  int8-nested: on -128 or +-112 (its int4 view's ends). Measured on SmolLM2-135M, keeping that one weight exact matters more for perplexity than the squared
  error of all others: setting it back to its true value after `clip` recovers almost all of clip's loss.
- `clip` (int4 and int8-nested; int8 and fp8 keep absmax): a grid over shrink factors of the absmax scale
  (clipping the few largest weights buys a finer step for all others), then least-squares refits of the
  scale to the chosen codes. int8-nested scores the int8 error plus the error of its int4 view.

peak and clip score every candidate by the weighted squared error sum_j c_j (w_j - Q(w)_j)^2 of its row or
group, where c_j is E[x_j^2] of input channel j from calibration (activation-aware, as AWQ weighs channels)
or 1, and keep the smallest.

Weights arrive grouped, `wg [out, ng, G]` fp32 (per-channel formats: ng = 1, G = in_features). Scales come
back in their stored dtype (fp32 per channel, fp16 per group; rounded *before* the codes are chosen, so the
codes match what is stored), with zeros (uint8, asym int4 only) or None.
"""

from __future__ import annotations

import torch

from strata.errors import UnsupportedError

FP8_MAX = 448.0  # largest finite float8_e4m3fn
CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(10))  # shrink factors of the absmax scale: 1.0 .. 0.55
REFITS = 2  # least-squares refits of the best int4 scale (each can move codes, so a second one still helps)


def round_codes(wg: torch.Tensor, fmt, s: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
    """Codes (as float) of wg on fmt's grid for scales s (fp32, nonzero, broadcast to wg) and zeros z."""
    x = wg / s
    if fmt.kind == "fp8":
        return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    if fmt.kind == "int8":
        return x.round().clamp(-127, 127)
    if fmt.kind == "int4":
        return x.round().clamp(-8, 7) if z is None else (x.round() + z).clamp(0, 15)
    q4 = (x / 16).round().clamp(-8, 7)  # int8-nested: a properly rounded int4 code, then the residual
    return 16 * q4 + (x - 16 * q4).round().clamp(-8, 7)


def code_values(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
    return (codes - z) * s if z is not None else codes * s


def _store(s: torch.Tensor, fmt) -> torch.Tensor:
    if fmt.group_size is None:
        return s.float()
    if s.abs().max() > torch.finfo(torch.float16).max:
        raise UnsupportedError(f"{fmt}: a group scale exceeds the float16 range (weights above ~4e5)")
    return s.to(torch.float16)


def safe_divisor(s: torch.Tensor) -> torch.Tensor:  # divisor that is 1 where a whole row/group is zero
    return torch.where(s == 0, torch.ones_like(s), s)


def _error(wg, fmt, s, z, c) -> torch.Tensor:  # [out, ng] weighted squared error of stored scales s
    sf = safe_divisor(s.float())[..., None]
    zf = None if z is None else z.float()[..., None]
    codes = round_codes(wg, fmt, sf, zf)
    d = code_values(codes, sf, zf) - wg
    err = d * d
    if fmt.kind == "int8-nested":  # the int4 view (high nibble, step 16 s) is a fallback copy: count it too
        q4 = ((codes + 8) / 16).floor()  # codes = 16 q4 + r with r in [-8, 7]
        d4 = q4 * 16 * sf - wg
        err = err + d4 * d4
    return (err * c).sum(-1) if c is not None else err.sum(-1)


def _asym_params(lo, hi, alpha, fmt):  # shrunk range [alpha lo, alpha hi] -> stored (s, z)
    s = _store(alpha * (hi - lo) / 15, fmt)
    z = (-alpha * lo / safe_divisor(s.float())).round().clamp(0, 15)
    return s, z.to(torch.uint8)


def _peak_asym(wg, fmt):
    """Asym int4 candidates that put each group's largest-magnitude weight on an end level (0 or 15).

    With that weight wm > 0 on level 15, s = wm / (15 - z) and the smallest z that keeps the minimum in range
    is ceil(15 (-lo) / (hi - lo)); one z lower clips the (smaller) other end a little. A negative wm on level 0
    mirrors it: s = -wm / z with z = floor(15 (-lo) / (hi - lo)), or one higher.
    """
    lo, hi = wg.amin(dim=2).clamp(max=0), wg.amax(dim=2).clamp(min=0)  # [out, ng]
    top = hi >= -lo  # the largest magnitude is the maximum
    t = 15 * -lo / safe_divisor(hi - lo)
    for step in (0, 1):
        z = torch.where(top, t.ceil() - step, t.floor() + step).clamp(0, 15)
        z = torch.where(top, z.clamp(max=14), z.clamp(min=1))  # a level is left for wm itself
        s = torch.where(top, hi / (15 - z), -lo / safe_divisor(z))
        yield _store(s, fmt), z.to(torch.uint8)


def _candidates(wg: torch.Tensor, fmt, method: str):
    """Yield (scales, zeros) candidates in stored dtypes; the first is the plain absmax choice."""
    # int8 and fp8 keep absmax: a clipping grid (1.0 .. 0.86) was never chosen for int8 and moved fp8's KL
    # and perplexity in opposite directions on both test models (docs/benchmarks/quant_quality.md)
    grid = CLIP_GRID if method == "clip" and fmt.kind in ("int4", "int8-nested") else (1.0,)
    if fmt.kind == "int4" and fmt.asym and method == "peak":
        yield from _peak_asym(wg, fmt)
        return
    if fmt.kind == "int4" and fmt.asym:
        lo, hi = wg.amin(dim=2).clamp(max=0), wg.amax(dim=2).clamp(min=0)
        for a in grid:
            yield _asym_params(lo, hi, a, fmt)
        return
    amax = wg.abs().amax(dim=2)  # [out, ng]
    qmax = {"int8": 127.0, "fp8": FP8_MAX, "int4": 7.0, "int8-nested": 112.0}[fmt.kind]
    bases = [amax / qmax]
    if fmt.kind in ("int4", "int8-nested") and (fmt.kind == "int4" or method == "peak"):
        # all levels: the largest weight lands on -8 (int8-nested: on -128, its int4 view's -8)
        signed_max = wg.gather(2, wg.abs().argmax(dim=2, keepdim=True)).squeeze(2)
        bases.append(signed_max / (-8 if fmt.kind == "int4" else -128))
    for a in grid:
        for b in bases:
            yield _store(a * b, fmt), None


def _refit(wg, fmt, s, z, c):
    """Least-squares scale for the codes that s (and z) give: argmin_t sum c (w - t (q - z))^2."""
    sf = safe_divisor(s.float())[..., None]
    zf = None if z is None else z.float()[..., None]
    q = round_codes(wg, fmt, sf, zf)
    q = q - zf if zf is not None else q
    cw = c if c is not None else 1.0
    num, den = (cw * q * wg).sum(-1), (cw * q * q).sum(-1)
    t = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), s.float())
    return _store(t.abs(), fmt), z


def choose_scales(wg: torch.Tensor, fmt, method: str = "clip", col_weight: torch.Tensor | None = None):
    """wg [out, ng, G] fp32 -> (scales [out, ng] or [out], zeros [out, ng] or None) minimising the error.

    col_weight [ng, G]: E[x_j^2] per input column (calibration), None for 1; `peak` and `clip` use it.
    """
    c = None
    if col_weight is not None and method in ("clip", "peak"):
        c = col_weight.float()
        c = c / c.mean().clamp(min=1e-30)
    best = None  # (scales, zeros, error [out, ng])

    def consider(s, z):
        nonlocal best
        err = _error(wg, fmt, s, z, c)
        if best is None:
            best = (s, z, err)
            return
        better = err < best[2]
        best = (torch.where(better, s, best[0]), None if z is None else torch.where(better, z, best[1]),
                torch.minimum(err, best[2]))

    for s, z in _candidates(wg, fmt, method):
        consider(s, z)
    if method == "clip" and fmt.kind == "int4":
        for _ in range(REFITS):
            consider(*_refit(wg, fmt, best[0], best[1], c))
    s, z = best[0], best[1]
    if fmt.group_size is None:
        return s[:, 0].contiguous(), None
    return s.contiguous(), None if z is None else z.contiguous()
