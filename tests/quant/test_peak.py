"""The `peak` method (strata/quant/search.py, the default): each group's largest weight stays exact."""

import pytest
import torch

from strata.quant.format import DEFAULT_METHOD, QuantFormat, dequantize_weight, quantize_weight

PEAK_FORMATS = ["int4-g32", "int4-g64", "int4-g32-asym", "int4-g64-asym", "int8-nested-g64"]


def _w(out=48, inp=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[::7, ::13] *= 6  # heavy tails, as real projections have
    w[1::5] = w[1::5].abs()  # rows without negative weights (asym: the zero point at 0)
    return w


def _peak_error(w, fmt, method):
    """|dequantized - true| of each group's largest-magnitude weight, relative to it: [out, ng]."""
    g = QuantFormat.parse(fmt).group_size
    d = dequantize_weight(quantize_weight(w, fmt, method=method), fmt, *w.shape)
    wg, dg = w.view(w.shape[0], -1, g), d.view(w.shape[0], -1, g)
    i = wg.abs().argmax(-1, keepdim=True)
    peak = wg.gather(-1, i)
    return ((dg.gather(-1, i) - peak).abs() / peak.abs()).squeeze(-1)


@pytest.mark.parametrize("fmt", PEAK_FORMATS)
def test_largest_weight_of_every_group_is_exact(fmt):
    w = _w()
    # exact up to the fp16 rounding of the scale (2^-11 relative, on the outermost level)
    assert _peak_error(w, fmt, "peak").max() < 2**-10
    # the check can fail: clip moves those weights (it shrinks the step of heavy-tailed groups)
    assert _peak_error(w, fmt, "clip").max() > 2**-6


def test_default_method_is_peak():
    w = _w(16, 128)
    assert DEFAULT_METHOD == "peak"
    for fmt in ("int4-g32", "int4-g64-asym"):
        a, b = quantize_weight(w, fmt), quantize_weight(w, fmt, method="peak")
        assert all(torch.equal(a[k], b[k]) for k in a)


def _sq(w, fmt, c=None, **kw):
    d = dequantize_weight(quantize_weight(w, fmt, **kw), fmt, *w.shape).double() - w.double()
    return (d * d if c is None else d * d * c.double()).sum(1)  # [out]


def test_weighted_error_never_above_rtn():
    """Symmetric int4: peak's candidates are rtn's, chosen by the calibration-weighted error instead."""
    w = _w()
    c = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) ** 4 * 10  # uneven input energy
    for fmt in ("int4-g32", "int4-g64"):
        rtn, peak = _sq(w, fmt, c, method="rtn"), _sq(w, fmt, c, method="peak", input_sq=c)
        assert (peak <= rtn * (1 + 1e-9)).all()
        assert peak.sum() < 0.995 * rtn.sum()  # and the weighting changes some choices


@pytest.mark.parametrize("fmt", ["int4-g32-asym", "int4-g64-asym"])
def test_asym_peak_lowers_error_against_range_rounding(fmt):
    """rtn's asym zero point round(-min / s) moves both ends by up to half a step; peak keeps the larger end."""
    w = _w()
    assert _sq(w, fmt, method="peak").sum() < _sq(w, fmt, method="rtn").sum()
    assert _peak_error(w, fmt, "rtn").max() > 2**-6


def test_all_zero_and_single_sign_groups():
    w = torch.zeros(4, 64)
    w[1, :32] = torch.linspace(0.1, 1.0, 32)  # positive only: zero point 0, s = max / 15
    w[2, 32:] = -torch.linspace(0.1, 1.0, 32)  # negative only: zero point 15
    for fmt in ("int4-g32", "int4-g32-asym", "int8-nested-g32"):
        d = dequantize_weight(quantize_weight(w, fmt), fmt, *w.shape)
        assert torch.isfinite(d).all() and (d[0] == 0).all() and (d[:, 32:][1] == 0).all()
        assert d[1, 31] == pytest.approx(1.0, rel=2**-10) and d[2, 63] == pytest.approx(-1.0, rel=2**-10)
