"""Quantized weight formats: names, on-disk tensors, and the reference quantize/dequantize.

A linear layer whose float weight is `X.weight [out, in]` is stored as `X.qweight`, `X.scales` and, for
asymmetric int4, `X.zeros` (layout table in docs/quantization.md). This file is the one place that knows the
layout; kernels (strata/layers/quant_native.py) read the same tensors. Formats, by name:

    int8              int8 [out, in], scales fp32 [out]          w = q * s
    int4-gG[-asym]    uint8 [out, Kp/2] two nibbles per byte,    w = (q - 8) * s      (symmetric)
                      scales fp16 [out, Kp/G], zeros uint8        w = (q - z) * s      (-asym)
    int8-nested-gG    uint8 [out, Kp], scales fp16 [out, Kp/G]   w = (b - 136) * s; b >> 4 is an int4-gG code
    fp8               float8_e4m3fn [out, in], scales fp32 [out] w = q * s
    q4_k, q5_k, q6_k  uint8 [out, in / 256 * B]: llama.cpp's K-quant super-blocks as in GGUF (kquant.py)
    mxfp4             uint8 [out, in/2] two e2m1 codes per byte  w = e2m1(q) * 2^(e - 127)   (OCP MX, gpt-oss)
                      (element 2j in the low nibble), scales uint8 e8m0 exponents e [out, in/32]
    q8_0, q4_1,       uint8 [out, in / 32 * B]: llama.cpp's 32-weight blocks as in GGUF (ggml_blocks.py)
    q5_0, q5_1

Kp is in_features rounded up to a multiple of G: the last group is zero-padded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from strata.errors import UnsupportedError, WeightsError
from strata.quant import ggml_blocks, kquant
from strata.quant.search import choose_scales, round_codes, safe_divisor

KINDS = ("int8", "int4", "int8-nested", "fp8", *kquant.BLOCK_BYTES, *ggml_blocks.BLOCK_BYTES, "mxfp4")
MXFP4_GROUP = 32  # elements sharing one e8m0 scale (OCP Microscaling spec)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # by code
MIN_GROUP, MAX_GROUP = 32, 1024
NESTED_OFFSET = 136  # b = 16 * (q4 + 8) + (r + 8) = 16 * q4 + r + 136
_NAME = re.compile(r"^(int8-nested|int8|int4|fp8|q4_k|q5_k|q6_k|q8_0|q4_1|q5_0|q5_1|mxfp4)(?:-g(\d+))?(-asym)?$")


@dataclass(frozen=True)
class QuantFormat:
    """One weight format. Build it with `QuantFormat.parse("int4-g64")`; str() gives the canonical name."""

    kind: str  # one of KINDS
    group_size: int | None = None  # None: one scale per output channel
    asym: bool = False  # int4 only: per-group zero points

    def __post_init__(self):  # a family nobody implements is refused here, never run with another's kernel
        if self.kind not in KINDS:
            raise UnsupportedError(f"quantization format family {self.kind!r}: expected one of {', '.join(KINDS)}")

    @classmethod
    def parse(cls, name: str | QuantFormat) -> QuantFormat:
        if isinstance(name, QuantFormat):
            return name
        text = str(name).strip().lower()
        if text == "fp8-e4m3":
            text = "fp8"
        m = _NAME.match(text)
        if not m:
            raise UnsupportedError(
                f"quantization format {name!r}: expected one of int8, int4-g32|g64|g128[-asym], "
                "int8-nested-g32|g64|g128, fp8, q4_k, q5_k, q6_k, q8_0, q4_1, q5_0, q5_1, mxfp4"
            )
        kind, group, asym = m.group(1), m.group(2), bool(m.group(3))
        grouped = kind in ("int4", "int8-nested")
        if grouped and group is None:
            raise UnsupportedError(f"quantization format {name!r}: {kind} needs a group size, e.g. {kind}-g64")
        if not grouped and group is not None:
            raise UnsupportedError(f"quantization format {name!r}: {kind} is per channel and takes no group size")
        if asym and kind != "int4":
            raise UnsupportedError(f"quantization format {name!r}: only int4 has an -asym variant")
        g = int(group) if group is not None else None
        if g is not None and (g & (g - 1) or not MIN_GROUP <= g <= MAX_GROUP):
            raise UnsupportedError(
                f"quantization format {name!r}: group size must be a power of two in "
                f"[{MIN_GROUP}, {MAX_GROUP}], got {g}"
            )
        return cls(kind, g, asym)

    def __str__(self) -> str:
        name = self.kind if self.group_size is None else f"{self.kind}-g{self.group_size}"
        return name + ("-asym" if self.asym else "")

    @property
    def bits(self) -> int:
        return 4 if self.kind in ("int4", "mxfp4") else 8

    @property
    def is_kquant(self) -> bool:
        """llama.cpp K-quant blocks kept as in GGUF: read by kernels and dequantize, never quantized to here."""
        return self.kind in kquant.BLOCK_BYTES

    @property
    def blocks(self):
        """The module that knows this format's llama.cpp blocks (kquant or ggml_blocks), None for Strata's own
        formats. Block formats are read by kernels and dequantize, never quantized to here."""
        return kquant if self.is_kquant else ggml_blocks if self.kind in ggml_blocks.BLOCK_BYTES else None

    def padded_in(self, in_features: int) -> int:
        """in_features rounded up to whole groups (the on-disk column count, in elements)."""
        g = self.group_size
        return in_features if g is None else -(-in_features // g) * g

    def tensor_specs(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Suffix -> (shape, dtype) of every stored tensor of one linear layer."""
        if self.blocks is not None:
            return {"qweight": ((out_features, self.blocks.row_bytes(self.kind, in_features)), torch.uint8)}
        if self.kind == "mxfp4":  # in_features is a multiple of MXFP4_GROUP (QuantLinear checks)
            return {"qweight": ((out_features, in_features // 2), torch.uint8),
                    "scales": ((out_features, in_features // MXFP4_GROUP), torch.uint8)}
        if self.group_size is None:
            qdtype = torch.int8 if self.kind == "int8" else torch.float8_e4m3fn
            return {"qweight": ((out_features, in_features), qdtype), "scales": ((out_features,), torch.float32)}
        kp = self.padded_in(in_features)
        ng = kp // self.group_size
        cols = kp // 2 if self.kind == "int4" else kp
        specs = {"qweight": ((out_features, cols), torch.uint8), "scales": ((out_features, ng), torch.float16)}
        if self.asym:
            specs["zeros"] = ((out_features, ng), torch.uint8)
        return specs

    def nbytes(self, out_features: int, in_features: int) -> int:
        """Bytes on disk and in RAM of one linear layer's quantized tensors."""
        return sum(
            torch.Size(shape).numel() * dtype.itemsize
            for shape, dtype in self.tensor_specs(out_features, in_features).values()
        )


def _grouped(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:  # [out, in] -> [out, ng, G] fp32
    if fmt.group_size is None:
        return w.float()[:, None, :]  # [out, 1, in]
    kp = fmt.padded_in(w.shape[1])
    w = torch.nn.functional.pad(w.float(), (0, kp - w.shape[1]))
    return w.view(w.shape[0], kp // fmt.group_size, fmt.group_size)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[out, K] values 0..15 (K even) -> uint8 [out, K/2], element 2j in the low nibble of byte j."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """uint8 [out, K/2] -> uint8 [out, K] values 0..15; inverse of pack_nibbles."""
    return torch.stack((p & 15, p >> 4), dim=-1).view(p.shape[0], -1)


CHUNK_ELEMENTS = 1 << 18  # rows are quantized in chunks of about this many weights (1 MiB fp32: in L2)
# how scales are chosen: search.py (rtn, peak, clip), gptq.py, and tune (per weight the same as gptq; then
# quantize_checkpoint tunes int4 scales and codes of the whole model end to end, quant_tune.py)
METHODS = ("rtn", "peak", "clip", "gptq", "tune")
DEFAULT_METHOD = "peak"  # data-free: keeps each group's largest weight exact (docs/quantization.md)


def check_method(method: str, what: str = "method") -> str:
    if method not in METHODS:
        raise UnsupportedError(f"{what} {method!r}: expected one of {', '.join(METHODS)}")
    return method


def quantize_weight(w: torch.Tensor, fmt: QuantFormat | str, method: str = DEFAULT_METHOD,
                    input_sq: torch.Tensor | None = None, hessian: torch.Tensor | None = None
                    ) -> dict[str, torch.Tensor]:
    """Float weight [out, in] -> the on-disk tensors of `fmt`, keyed by suffix (qweight, scales[, zeros]).

    method: rtn (absmax), peak (each group's largest weight exact; the default), clip (error-minimising
    clipping); peak and clip weigh errors by input_sq [in] = E[x_j^2] when given
    or gptq (needs hessian [in, in] = E[x x^T] from calibration; gptq.py). tune: gptq here (the end-to-end
    tuning is model-level: quant_tune.py).
    """
    fmt = QuantFormat.parse(fmt)
    check_method(method)
    if fmt.blocks is not None or fmt.kind == "mxfp4":
        raise UnsupportedError(f"format {fmt}: such weights come from GGUF files or checkpoints as they are; "
                               "Strata does not quantize into them (use int4-gG or int8)")
    if w.dim() != 2 or not w.is_floating_point():
        raise WeightsError(f"quantize_weight: expected a 2-D float weight [out, in], got {tuple(w.shape)} {w.dtype}")
    if not torch.isfinite(w).all():
        raise WeightsError(f"quantize_weight: weight {tuple(w.shape)} contains inf or nan")
    for what, t, shape in (("input_sq", input_sq, (w.shape[1],)), ("hessian", hessian, (w.shape[1],) * 2)):
        if t is not None and tuple(t.shape) != shape:
            raise WeightsError(f"quantize_weight: {what} must be {list(shape)} for a weight {list(w.shape)}, "
                               f"got {list(t.shape)}")
    if method in ("gptq", "tune"):
        if hessian is None:
            raise WeightsError(f"quantize_weight: method {method} needs the calibration hessian E[x x^T] [in, in]")
        from strata.quant.gptq import gptq_codes

        codes, s, z = gptq_codes(_grouped(w, fmt), fmt, hessian)
        return pack_codes(codes, fmt, s, z)
    col = None if input_sq is None else _grouped(input_sq[None].float(), fmt)[0]  # [ng, G]
    rows = max(1, CHUNK_ELEMENTS // max(1, w.shape[1]))
    parts = [_quantize_rows(w[i : i + rows], fmt, method, col) for i in range(0, w.shape[0], rows)]
    return {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}


def _quantize_rows(w: torch.Tensor, fmt: QuantFormat, method: str, col: torch.Tensor | None):
    wg = _grouped(w, fmt)  # [out, ng, G]
    s, z = choose_scales(wg, fmt, method, col)
    sf = safe_divisor(s.float()).view(wg.shape[0], -1, 1)
    zf = None if z is None else z.float()[..., None]
    return pack_codes(round_codes(wg, fmt, sf, zf), fmt, s, z)


def pack_codes(codes: torch.Tensor, fmt: QuantFormat, s: torch.Tensor, z: torch.Tensor | None
               ) -> dict[str, torch.Tensor]:
    """Float codes [out, ng, G] (from search.round_codes) and stored scales/zeros -> on-disk tensors."""
    out = codes.shape[0]
    codes = codes.reshape(out, -1)
    if fmt.kind == "int8":
        q = codes.to(torch.int8)
    elif fmt.kind == "fp8":
        q = codes.to(torch.float8_e4m3fn)  # exact: the codes are fp8 values already
    elif fmt.kind == "int8-nested":
        q = (codes + NESTED_OFFSET).to(torch.uint8)
    else:
        q = pack_nibbles(codes if fmt.asym else codes + 8)
    t = {"qweight": q.contiguous(), "scales": s.contiguous()}
    if z is not None:
        t["zeros"] = z.contiguous()
    return t


def check_tensors(tensors: dict[str, torch.Tensor], fmt: QuantFormat, out_features: int, in_features: int,
                  name: str = "weight") -> None:
    """Raise WeightsError unless `tensors` has exactly the shapes and dtypes `fmt` stores."""
    for suffix, (shape, dtype) in fmt.tensor_specs(out_features, in_features).items():
        t = tensors.get(suffix)
        if t is None:
            raise WeightsError(f"{name}.{suffix}: missing (format {fmt} for a [{out_features}, {in_features}] linear)")
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise WeightsError(
                f"{name}.{suffix}: expected {list(shape)} {dtype} for format {fmt} of a "
                f"[{out_features}, {in_features}] linear, found {list(t.shape)} {t.dtype}"
            )


def dequantize_weight(tensors: dict[str, torch.Tensor], fmt: QuantFormat | str, out_features: int,
                      in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantization: the stored tensors -> float weight [out, in] (slow, exact in `dtype`)."""
    fmt = QuantFormat.parse(fmt)
    check_tensors(tensors, fmt, out_features, in_features)
    if fmt.blocks is not None:
        return fmt.blocks.dequantize(tensors["qweight"], fmt.kind, out_features, in_features).to(dtype)
    if fmt.kind == "mxfp4":
        lut = torch.tensor(E2M1_VALUES, dtype=torch.float32)
        w = lut[unpack_nibbles(tensors["qweight"]).long()].view(out_features, -1, MXFP4_GROUP)  # [out, in/32, 32]
        exp = tensors["scales"].to(torch.int32) - 127  # [out, in/32]
        return torch.ldexp(w, exp[..., None]).view(out_features, in_features).to(dtype)  # exact in bf16 too
    q, s = tensors["qweight"], tensors["scales"].to(dtype)
    if fmt.group_size is None:
        return q.to(dtype) * s[:, None]
    if fmt.kind == "int4":
        codes = unpack_nibbles(q).to(dtype)  # [out, Kp]
        zeros = tensors["zeros"].to(dtype) if fmt.asym else torch.full_like(s, 8.0)
    else:
        codes = q.to(dtype)
        zeros = torch.full_like(s, float(NESTED_OFFSET))
    g = fmt.group_size
    w = (codes.view(out_features, -1, g) - zeros[..., None]) * s[..., None]  # [out, ng, G]
    return w.view(out_features, -1)[:, :in_features]


def nested_int4_view(tensors: dict[str, torch.Tensor], fmt: QuantFormat | str) -> tuple[dict, QuantFormat]:
    """The int4 copy inside an int8-nested-gG weight: (tensors, int4-gG format), no requantization.

    The high nibble of each byte is the symmetric int4 code and the int4 scale is 16x the int8 step, so
    a tier can keep this half-size copy and still load the int8 original from the same file later.
    """
    fmt = QuantFormat.parse(fmt)
    if fmt.kind != "int8-nested":
        raise UnsupportedError(f"nested_int4_view: format {fmt} is not int8-nested-gG")
    q = tensors["qweight"] >> 4  # [out, Kp] int4 codes 0..15
    scales = (tensors["scales"].float() * 16).to(torch.float16)  # x16 is exact in fp16
    return {"qweight": pack_nibbles(q), "scales": scales}, QuantFormat("int4", fmt.group_size)


# quant_method values whose tensors keep their checkpoint names and are read by a family's own modules
# (CausalLM.own_quant_methods): gpt-oss's mxfp4 experts
MODULE_METHODS = ("mxfp4",)


def read_quantization_config(config: dict, module_methods: tuple[str, ...] = ()) -> dict[str, QuantFormat]:
    """config.json dict -> {module name: format} for quant_method "strata" (empty if unquantized, or quantized
    with one of `module_methods`, which the model's modules read themselves)."""
    qc = config.get("quantization_config")
    if not qc or qc.get("quant_method") in module_methods:
        return {}
    if qc.get("quant_method") != "strata":
        raise UnsupportedError(
            f"config.json quantization_config.quant_method: expected 'strata', found {qc.get('quant_method')!r}"
        )
    modules = qc.get("modules")
    if not isinstance(modules, dict):
        raise WeightsError("config.json quantization_config.modules: expected a {module name: format} mapping")
    out = {}
    for name, f in modules.items():
        try:
            out[name] = QuantFormat.parse(f)
        except UnsupportedError as e:
            raise UnsupportedError(f"config.json quantization_config.modules[{name!r}]: {e}") from None
    return out
