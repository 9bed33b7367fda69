"""Number formats: stored bits per element (scales included) and which peak-FLOPs figure their math uses.

A `Precisions` says what weights (optionally routed experts separately), activations and the KV cache are
stored in. Names of published formats (GGUF Q4_K_M, GPTQ, NVFP4...) map to their effective bits per weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from strata.errors import ConfigError

# name -> (bits per element including block scales, compute precision whose peak FLOPs apply).
# GGUF single-block types: the block size and bytes from the gguf package (GGML_QUANT_SIZES), e.g. Q4_0 = 18 bytes
# per 32 weights = 4.5 bits. GGUF mixes (Q4_K_M, Q3_K_S, IQ2_M...) choose a block type per tensor; their bits are
# the whole-file averages llama.cpp's quantize tool states for Llama-3-8B (tools/quantize/quantize.cpp: sizes in
# GiB for 8.03 B weights, or bits per weight where it states those).
GGUF_MIX_BITS = {
    "q2_k": 3.17, "q2_k_s": 3.17, "q3_k_s": 3.65, "q3_k_m": 4.00, "q3_k_l": 4.31, "q4_k_s": 4.67, "q4_k_m": 4.90,
    "q5_k_s": 5.57, "q5_k_m": 5.70, "iq2_m": 2.7, "iq3_xs": 3.3, "iq3_m": 3.66,
}
GGUF_BLOCK_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q3_k", "q4_k", "q5_k", "q6_k", "iq1_s", "iq1_m",
                    "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0")


def _gguf_block_bits() -> dict[str, float]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    out = {}
    for name in GGUF_BLOCK_TYPES:
        block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[name.upper()]]
        out[name] = 8.0 * nbytes / block
    return out


FORMATS: dict[str, tuple[float, str]] = {
    "fp32": (32.0, "fp32"),
    "bf16": (16.0, "fp16"),
    "fp16": (16.0, "fp16"),
    "fp8": (8.0, "fp8"),
    "int8": (8.0, "int8"),  # W8A8
    "int8wo": (8.0, "fp16"),  # weight-only int8, math in fp16
    "int8amx": (8.0, "amx_int8"),  # W8A8 on Intel AMX tiles (KTransformers' online int8)
    "int4": (4.25, "fp16"),  # weight-only, group 128 with scale + zero (AWQ)
    "int4-g64": (4.25, "fp16"),  # Strata int4, group 64 with a bf16 scale
    "int4-g128": (4.125, "fp16"),  # Strata int4, group 128 with a bf16 scale
    "fp8wo": (8.0, "fp16"),  # weight-only fp8 (e4m3 codes + per-channel scale), math in bf16 (Strata on CPUs)
    "gptq4": (4.25, "fp16"),  # GPTQ 4-bit, group 128 with fp16 scale + packed zero
    "gptq8": (8.25, "fp16"),
    "q4f16": (4.5, "fp16"),  # MLC q4f16_1, group 32 fp16 scale
    "mlx4": (4.5, "fp16"),  # MLX affine 4-bit: group 64 with a 16-bit scale and bias (mlx-lm convert -q default)
    "mlx8": (8.5, "fp16"),
    "nf4": (4.127, "fp16"),  # bitsandbytes NF4: block 64 absmax, double-quantized
    "hqq2": (2.5, "fp16"),  # HQQ 2-bit, group 16 (mixtral-offloading's experts)
    "hqq3": (3.5, "fp16"),
    "nvfp4": (4.5, "fp4"),  # 16 elements share an fp8 scale
    "mxfp4": (4.25, "int8"),  # OCP MX: 32 elements share an 8-bit exponent (gpt-oss experts; GGUF MXFP4)
    **{k: (v, "int8") for k, v in _gguf_block_bits().items()},
    **{k: (v, "int8") for k, v in GGUF_MIX_BITS.items()},
}
# Formats whose weights are expanded (dequantized) inside the GEMV: block / group / weight-only formats. Their
# decode kernels reach a smaller share of the memory bandwidth than an fp16 GEMV (efficiency factor eta_q).
NATIVE = {"fp32", "bf16", "fp16", "fp8", "int8", "int8amx", "nvfp4"}
# Strata's format names (strata quantize) -> the names here
STRATA_FORMATS = {"bf16": "bf16", "int8": "int8wo", "int4-g64": "int4-g64", "int4-g128": "int4-g128", "fp8": "fp8wo"}
ALIASES = {"f16": "fp16", "float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "f32": "fp32",
           "q4km": "q4_k_m", "q5km": "q5_k_m", "q6k": "q6_k", "q80": "q8_0", "q40": "q4_0", "iq4xs": "iq4_xs",
           "iq4xsr4": "iq4_xs", "int4wo": "int4", "awq": "int4", "gptq": "gptq4", "q3_k": "q3_k_m",
           "q4_k": "q4_k_m", "q5_k": "q5_k_m", "fp8wo": "fp8wo", "e4m3": "fp8"}
# A GGUF file's measured bits per weight: "bpw4.871" (quantized blocks, integer dot products like llama.cpp's MMQ)
_BPW = re.compile(r"^bpw(\d+(?:\.\d+)?)$")


def bits(fmt: str) -> float:
    f = canon(fmt)
    m = _BPW.match(f)
    return float(m.group(1)) if m else FORMATS[f][0]


def bytes_per_elem(fmt: str) -> float:
    return bits(fmt) / 8


def needs_dequant(fmt: str) -> bool:
    return canon(fmt) not in NATIVE


def compute_kind(fmt: str) -> str:
    f = canon(fmt)
    return "int8" if _BPW.match(f) else FORMATS[f][1]


def canon(fmt: str) -> str:
    f = fmt.strip().lower()
    if f in FORMATS or _BPW.match(f):
        return f
    if f in ALIASES:
        return ALIASES[f]
    f2 = re.sub(r"[^a-z0-9]", "", f)
    f2 = ALIASES.get(f2, _SQUASHED.get(f2, f2))
    if f2 in FORMATS:
        return f2
    raise ConfigError(f"precision {fmt!r}: unknown; expected one of {', '.join(FORMATS)}")


_SQUASHED = {re.sub(r"[^a-z0-9]", "", k): k for k in FORMATS}
# What "4-bit" / "8-bit" mean in an engine's own vocabulary (its default quantizer)
ENGINE_BITS = {
    "llama.cpp": {4: "q4_0", 8: "q8_0"},  # ggml's original 4-bit / 8-bit block types
    "mlx": {4: "mlx4", 8: "mlx8"},  # mlx-lm convert -q --q-bits 4 (group 64)
    "transformers": {4: "nf4", 8: "int8wo"},  # bitsandbytes load_in_4bit / load_in_8bit
    "mlc": {4: "q4f16"},
    "exllama": {4: "gptq4"},
    "mixtral-offloading": {4: "int4", 2: "hqq2", 3: "hqq3"},
}
_PUBLISHED = (  # free-text patterns, most specific first
    (r"\bnvfp4\b|\bfp4\b", "nvfp4"), (r"\bmxfp4\b", "mxfp4"), (r"q4f16", "q4f16"), (r"\bnf4\b", "nf4"),
    (r"online int8", "int8amx"), (r"int8 weights|weight-only int8|\bint8wo\b", "int8wo"),
    (r"\bawq\b|w4a16|\bint4\b", "int4"), (r"gptq.{0,12}8[- ]?bit|8[- ]?bit.{0,12}gptq", "gptq8"), (r"gptq", "gptq4"),
    (r"w8a8|\bint8\b", "int8"), (r"\bfp8\b|\bf8\b|e4m3", "fp8"), (r"hqq.{0,8}2[- ]?bit", "hqq2"),
    (r"hqq.{0,8}3[- ]?bit", "hqq3"), (r"\bfp32\b|\bf32\b|float32", "fp32"), (r"\bf16\b|fp16|bf16|float16|half", "fp16"),
)
_GGUF_NAME = re.compile(r"(?<![a-z0-9])(i?q\d_[a-z0-9]+(?:_[a-z0-9]+)?|tq\d_\d)(?![a-z0-9])")


def parse_published(text: str, engine: str = "") -> str | None:
    """Best reading of a free-text quantization column ('Q4_K_M (GGUF)', '4-bit GPTQ', 'IQ4_XS_R4'...), with
    '4-bit' / '8-bit' read in the engine's vocabulary (llama.cpp: Q4_0, MLX: its affine 4-bit...); None if unstated."""
    t = text.lower()
    for m in _GGUF_NAME.finditer(t):
        name = re.sub(r"_r\d$", "", m.group(1))  # ik_llama.cpp's row-interleaved repacks (IQ4_XS_R4) keep their bits
        try:
            return canon(name)
        except ConfigError:
            continue
    for pat, fmt in _PUBLISHED:
        if re.search(pat, t):
            return fmt
    m = re.search(r"\b([2348])[- ]?bit\b", t)
    if m:
        nbits = int(m.group(1))
        table = ENGINE_BITS.get(engine, {})
        if nbits in table:
            return table[nbits]
        return {4: "q4f16", 8: "int8wo"}.get(nbits)
    return None


@dataclass
class Precisions:
    weights: str = "bf16"
    experts: str | None = None  # routed experts, when stored differently (mixed per expert)
    activations: str = "bf16"
    kv: str = "bf16"
    head: str | None = None  # embedding and lm_head, when stored differently (Strata keeps them bf16)

    def __post_init__(self):
        for f in (self.weights, self.experts or self.weights, self.activations, self.kv, self.head or self.weights):
            canon(f)

    def fmt(self, routed: bool = False, head: bool = False) -> str:
        if head and self.head:
            return canon(self.head)
        return canon(self.experts if routed and self.experts else self.weights)

    def weight_bytes(self, routed: bool, head: bool = False) -> float:
        return bytes_per_elem(self.fmt(routed, head))

    def compute(self, routed: bool = False) -> str:
        return compute_kind(self.experts if routed and self.experts else self.weights)
