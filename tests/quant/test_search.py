"""Scale selection (strata/quant/search.py, gptq.py): clip and gptq beat absmax on the error each one minimises."""

import pytest
import torch

from strata.errors import UnsupportedError, WeightsError
from strata.quant.format import QuantFormat, check_tensors, dequantize_weight, quantize_weight

FORMATS = ["int8", "fp8", "int4-g32", "int4-g64", "int4-g64-asym", "int8-nested-g64"]


def _w(out=48, inp=172, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[::7, ::13] *= 6  # heavy tails, as real projections have: what clipping trades against
    return w


def _err(w, fmt, weight=None, **kw):
    t = quantize_weight(w, fmt, **kw)
    check_tensors(t, QuantFormat.parse(fmt), *w.shape)  # same on-disk layout whatever the method
    d = dequantize_weight(t, fmt, *w.shape).double() - w.double()  # [out, in]
    return d if weight is None else d * weight.double().sqrt()


@pytest.mark.parametrize("fmt", FORMATS)
def test_clip_never_worse_than_absmax(fmt):
    w = _w()
    rtn, clip = _err(w, fmt, method="rtn"), _err(w, fmt, method="clip")
    if fmt.startswith("int8-nested"):
        return  # its search also weighs the int4 view; checked below
    # the grid contains the absmax scale, so no row (or group) can get worse
    assert ((clip**2).sum(1) <= (rtn**2).sum(1) * (1 + 1e-6) + 1e-12).all()
    if fmt.startswith("int4"):
        assert (clip**2).sum() < 0.97 * (rtn**2).sum()  # and int4 gains (measured: 5-8% lower)


def test_nested_clip_improves_its_int4_view():
    from strata.quant.format import nested_int4_view

    w, fmt = _w(), "int8-nested-g64"
    errs = []
    for method in ("rtn", "clip"):
        view, f4 = nested_int4_view(quantize_weight(w, fmt, method=method), fmt)
        errs.append(float(((dequantize_weight(view, f4, *w.shape) - w) ** 2).sum()))
    assert errs[1] < errs[0]


def test_activation_weighting_lowers_weighted_error():
    w = _w()
    c = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) ** 4 * 10  # uneven input energy
    plain = _err(w, "int4-g64", c, method="clip")
    aware = _err(w, "int4-g64", c, method="clip", input_sq=c)
    assert (aware**2).sum() < (plain**2).sum()


@pytest.mark.parametrize("fmt", ["int4-g32", "int4-g64-asym", "int8"])
def test_gptq_lowers_output_error(fmt):
    w = _w(32, 96)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 96, generator=g) @ (torch.randn(96, 96, generator=g) * 0.3 + torch.eye(96))  # correlated
    h = x.T @ x / x.shape[0]  # [in, in]
    out_err = {m: float((_err(w, fmt, method=m, hessian=h if m == "gptq" else None) @ x.T.double()).pow(2).sum())
               for m in ("clip", "gptq")}
    assert out_err["gptq"] < 0.9 * out_err["clip"]


def test_bad_method_and_statistics():
    with pytest.raises(UnsupportedError, match="method 'awq': expected one of rtn, peak, clip, gptq"):
        quantize_weight(_w(4, 64), "int4-g64", method="awq")
    with pytest.raises(WeightsError, match="gptq needs the calibration hessian"):
        quantize_weight(_w(4, 64), "int4-g64", method="gptq")
    with pytest.raises(WeightsError, match=r"input_sq must be \[64\]"):
        quantize_weight(_w(4, 64), "int4-g64", input_sq=torch.ones(63))


def test_planner_error_with_hessian_matches_diagonal_weighting():
    from strata.weights.quant_plan import weight_error

    w, fmt = _w(16, 64), QuantFormat.parse("int4-g32")
    c = torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5
    assert weight_error(w, fmt, None, "rtn", torch.diag(c)) == pytest.approx(weight_error(w, fmt, c, "rtn"), rel=1e-5)
    assert weight_error(w, fmt, None, "clip", torch.eye(64)) == pytest.approx(weight_error(w, fmt, method="clip"), rel=1e-5)
