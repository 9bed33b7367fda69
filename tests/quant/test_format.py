"""Quantized weight formats: names, round trips against error bounds, padding, nested int4 view, bad input."""

import pytest
import torch

from strata.errors import UnsupportedError, WeightsError
from strata.quant.format import (
    QuantFormat,
    check_tensors,
    dequantize_weight,
    nested_int4_view,
    pack_nibbles,
    quantize_weight,
    read_quantization_config,
    unpack_nibbles,
)
from strata.weights.quant_plan import MixedPlanConfig, parse_size, plan_mixed, unit_of

FORMATS = ["int8", "fp8", "int4-g32", "int4-g64", "int4-g128", "int4-g64-asym", "int8-nested-g32",
           "int8-nested-g64"]
SHAPES = [(37, 172), (5, 33), (64, 256), (1, 1)]


def _w(out, inp, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[0, 0] = 0.4  # an outlier, as real weights have
    return w


@pytest.mark.parametrize("name,canonical", [
    ("int8", "int8"), ("INT4-G64", "int4-g64"), ("int4-g128-asym", "int4-g128-asym"), ("fp8-e4m3", "fp8"),
    ("int8-nested-g64", "int8-nested-g64"), ("fp8", "fp8"),
])
def test_parse_names(name, canonical):
    fmt = QuantFormat.parse(name)
    assert str(fmt) == canonical
    assert QuantFormat.parse(str(fmt)) == fmt


@pytest.mark.parametrize("name,needle", [
    ("int3", "expected one of"), ("int4", "needs a group size"), ("int4-g48", "power of two"),
    ("int4-g16", "power of two"), ("int8-g64", "takes no group size"), ("fp8-asym", "only int4"),
    ("int4-g2048", "power of two"),
])
def test_bad_format_names(name, needle):
    with pytest.raises(UnsupportedError, match=needle):
        QuantFormat.parse(name)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_within_half_step(fmt, shape):
    fmt = QuantFormat.parse(fmt)
    w = _w(*shape)
    t = quantize_weight(w.to(torch.bfloat16), fmt, method="rtn")  # clipping (the default) may exceed a step
    check_tensors(t, fmt, *shape)
    assert sum(v.numel() * v.element_size() for v in t.values()) == fmt.nbytes(*shape)
    d = dequantize_weight(t, fmt, *shape, dtype=torch.float64)
    assert d.shape == shape
    err = (d - w.to(torch.bfloat16).double()).abs()
    if fmt.kind == "fp8":  # 3 mantissa bits: relative error 2^-4, plus the subnormal step near zero
        step = w.abs().double() * 2.0**-4 + t["scales"].double()[:, None] * 2.0**-9
    elif fmt.group_size is None:
        step = t["scales"].double()[:, None].expand(shape) / 2
    else:  # group step, per element; the int4 scale candidate (max)/-8 may clamp one level: allow a full step
        g = fmt.group_size
        s = t["scales"].double().abs().repeat_interleave(g, dim=1)[:, : shape[1]]
        step = s * (0.5 if fmt.asym else 1.0)
    slack = 1e-4 if fmt.group_size is None else 1e-2  # fp16 group scales are rounded before quantizing
    assert (err <= step * (1 + slack) + 1e-12).all()


def test_exact_grid_values_survive():
    s = torch.tensor([0.01, 0.5, 3.0])
    q = torch.randint(-127, 128, (3, 40)).float()
    q[:, 0] = 127
    w = q * s[:, None]
    t = quantize_weight(w, "int8")
    assert torch.equal(dequantize_weight(t, "int8", 3, 40), w)


@pytest.mark.parametrize("fmt", ["int4-g64", "int4-g32-asym", "int8-nested-g64"])
def test_padding_of_last_group(fmt):
    fmt = QuantFormat.parse(fmt)
    t = quantize_weight(_w(7, 172), fmt)  # stories260K's FFN width: 172 = 2 * 64 + 44
    cols = 192  # 172 rounded up to whole groups of 32 or 64
    assert t["qweight"].shape == ((7, cols // 2) if fmt.kind == "int4" else (7, cols))
    assert t["scales"].shape == (7, cols // fmt.group_size)
    assert dequantize_weight(t, fmt, 7, 172).shape == (7, 172)


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_weight_gives_zero(fmt):
    t = quantize_weight(torch.zeros(3, 70), fmt)
    d = dequantize_weight(t, fmt, 3, 70)
    assert torch.equal(d, torch.zeros(3, 70))


def test_nibble_packing_order():
    q = torch.tensor([[1, 2, 15, 0]])
    p = pack_nibbles(q)
    assert p.tolist() == [[0x21, 0x0F]]  # element 2j in the low nibble
    assert torch.equal(unpack_nibbles(p), q.to(torch.uint8))


@pytest.mark.parametrize("g", [32, 64, 128])
def test_nested_int4_view(g):
    fmt = QuantFormat.parse(f"int8-nested-g{g}")
    w = _w(16, 200)
    t = quantize_weight(w, fmt, method="rtn")
    view, f4 = nested_int4_view(t, fmt)
    assert f4 == QuantFormat.parse(f"int4-g{g}")
    check_tensors(view, f4, 16, 200)
    d4 = dequantize_weight(view, f4, 16, 200, dtype=torch.float64)
    s4 = view["scales"].double().repeat_interleave(g, dim=1)[:, :200]
    assert ((d4 - w.double()).abs() <= s4 / 2 * (1 + 1e-3)).all()  # a properly rounded int4
    d8 = dequantize_weight(t, fmt, 16, 200, dtype=torch.float64)
    assert (d8 - w.double()).abs().mean() < (d4 - w.double()).abs().mean() / 8  # the int8 is ~16x finer


def test_nested_view_rejects_other_formats():
    with pytest.raises(UnsupportedError, match="not int8-nested"):
        nested_int4_view(quantize_weight(_w(2, 64), "int4-g64"), "int4-g64")


def test_check_tensors_errors_name_tensor():
    fmt = QuantFormat.parse("int4-g64-asym")
    t = quantize_weight(_w(4, 64), fmt)
    with pytest.raises(WeightsError, match=r"layer\.zeros: missing"):
        check_tensors({k: v for k, v in t.items() if k != "zeros"}, fmt, 4, 64, "layer")
    with pytest.raises(WeightsError, match=r"layer\.scales: expected \[4, 1\] torch.float16.*found \[4, 1\] torch.float32"):
        check_tensors({**t, "scales": t["scales"].float()}, fmt, 4, 64, "layer")
    with pytest.raises(WeightsError, match="expected a 2-D float weight"):
        quantize_weight(torch.zeros(4), fmt)
    with pytest.raises(WeightsError, match="inf or nan"):
        quantize_weight(torch.full((2, 2), float("nan")), fmt)


def test_read_quantization_config():
    cfg = {"quantization_config": {"quant_method": "strata", "format": "mixed",
                                   "modules": {"a.q_proj": "int8", "a.mlp.experts.0.w1": "int4-g64"}}}
    assert read_quantization_config(cfg) == {"a.q_proj": QuantFormat("int8"),
                                             "a.mlp.experts.0.w1": QuantFormat("int4", 64)}
    assert read_quantization_config({}) == {}
    with pytest.raises(UnsupportedError, match="quant_method"):
        read_quantization_config({"quantization_config": {"quant_method": "gptq"}})


def test_parse_size():
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("4096") == 4096
    with pytest.raises(UnsupportedError, match="--budget"):
        parse_size("lots")


def test_mixed_plan_prefers_important_experts_and_fits_budget():
    shapes = {f"m.layers.0.mlp.experts.{e}.{p}": (64, 256) for e in range(4) for p in ("w1", "w2", "w3")}
    shapes["m.layers.0.self_attn.q_proj"] = (256, 256)
    errors = {(m, f): {"int8": 1.0, "int4-g64": 200.0}[f] * shapes[m][0] * shapes[m][1]
              for m in shapes for f in ("int8", "int4-g64")}
    int8, int4 = QuantFormat.parse("int8"), QuantFormat.parse("int4-g64")
    base = sum(int4.nbytes(*s) for s in shapes.values())
    one_expert_up = 3 * (int8.nbytes(64, 256) - int4.nbytes(64, 256))
    attn_up = int8.nbytes(256, 256) - int4.nbytes(256, 256)
    cfg = MixedPlanConfig(budget_bytes=base + attn_up + one_expert_up + 10, formats=("int8", "int4-g64"),
                          expert_frequency=0.5, importance={"m.layers.0.mlp.experts.2": 5.0})
    plan = plan_mixed(shapes, cfg, errors)
    assert plan["m.layers.0.self_attn.q_proj"] == "int8"
    assert {plan[f"m.layers.0.mlp.experts.2.{p}"] for p in ("w1", "w2", "w3")} == {"int8"}
    assert all(plan[f"m.layers.0.mlp.experts.{e}.w1"] == "int4-g64" for e in (0, 1, 3))
    assert sum(QuantFormat.parse(plan[m]).nbytes(*s) for m, s in shapes.items()) <= cfg.budget_bytes
    assert unit_of("m.layers.0.mlp.experts.2.w1") == "m.layers.0.mlp.experts.2"
    with pytest.raises(UnsupportedError, match="too small"):
        plan_mixed(shapes, MixedPlanConfig(budget_bytes=base - 1, formats=("int8", "int4-g64")), errors)


def test_output_error_weights_columns_by_input_energy(tmp_path):
    from safetensors.torch import save_file

    from strata.weights.quant_plan import load_calibration, weight_error

    w = _w(8, 64)
    fmt = QuantFormat.parse("int4-g32")
    plain = weight_error(w, fmt)
    assert weight_error(w, fmt, torch.ones(64)) == pytest.approx(plain)
    assert weight_error(w, fmt, torch.zeros(64)) == 0.0
    assert weight_error(w, fmt, torch.full((64,), 4.0)) == pytest.approx(4 * plain)
    path = tmp_path / "calib.safetensors"
    save_file({"m.experts.1.w1.input_sq_mean": torch.ones(64), "m.experts.1.routing_frequency": torch.tensor(0.25)},
              str(path))
    input_sq, freq = load_calibration(path)
    assert set(input_sq) == {"m.experts.1.w1"} and freq == {"m.experts.1": 0.25}
    save_file({"m.experts.1.w1.other": torch.ones(2)}, str(path))
    with pytest.raises(WeightsError, match="neither"):
        load_calibration(path)
