"""Number formats: stored bits per element (scales included) and which peak-FLOPs figure their math uses.

A `Precisions` says what weights (optionally routed experts separately), activations and the KV cache are
stored in. Names of published formats (GGUF Q4_K_M, GPTQ, NVFP4...) map to their effective bits per weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from strata.errors import ConfigError

# name -> (bits per element including block scales, compute precision whose peak FLOPs apply)
# GGUF block sizes: Q4_0 = 18 bytes / 32 weights, Q8_0 = 34 / 32, Q6_K = 210 / 256, IQ4_XS = 136 / 256;
# Q4_K_M and Q5_K_M mix block types per tensor (llama.cpp's own size tables give ~4.85 and ~5.7 bits).
FORMATS: dict[str, tuple[float, str]] = {
    "fp32": (32.0, "fp32"),
    "bf16": (16.0, "fp16"),
    "fp16": (16.0, "fp16"),
    "fp8": (8.0, "fp8"),
    "int8": (8.0, "int8"),  # W8A8
    "int8wo": (8.0, "fp16"),  # weight-only int8, math in fp16
    "int8amx": (8.0, "amx_int8"),  # W8A8 on Intel AMX tiles (KTransformers' online int8)
    "int4": (4.25, "fp16"),  # weight-only, group 128 with scale + zero
    "int4-g64": (4.25, "fp16"),  # Strata int4, group 64 with a bf16 scale
    "int4-g128": (4.125, "fp16"),  # Strata int4, group 128 with a bf16 scale
    "fp8wo": (8.0, "fp16"),  # weight-only fp8 (e4m3 codes + per-channel scale), math in bf16 (Strata on CPUs)
    "gptq4": (4.25, "fp16"),
    "q4f16": (4.5, "fp16"),  # MLC q4f16_1, group 32 fp16 scale
    "nvfp4": (4.5, "fp4"),  # 16 elements share an fp8 scale
    "q8_0": (8.5, "int8"),
    "q6_k": (6.5625, "int8"),
    "q5_k_m": (5.7, "int8"),
    "q4_k_m": (4.85, "int8"),
    "q4_0": (4.5, "int8"),
    "iq4_xs": (4.25, "int8"),
}
# Formats whose weights are expanded (dequantized) inside the GEMV: block / group / weight-only formats. Their
# decode kernels reach a smaller share of the memory bandwidth than an fp16 GEMV (efficiency factor eta_q).
NATIVE = {"fp32", "bf16", "fp16", "fp8", "int8", "int8amx", "nvfp4"}
# Strata's format names (strata quantize) -> the names here
STRATA_FORMATS = {"bf16": "bf16", "int8": "int8wo", "int4-g64": "int4-g64", "int4-g128": "int4-g128", "fp8": "fp8wo"}
ALIASES = {"f16": "fp16", "float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "f32": "fp32",
           "q4km": "q4_k_m", "q5km": "q5_k_m", "q6k": "q6_k", "q80": "q8_0", "q40": "q4_0", "iq4xs": "iq4_xs",
           "iq4xsr4": "iq4_xs", "int4wo": "int4"}


def bytes_per_elem(fmt: str) -> float:
    return FORMATS[canon(fmt)][0] / 8


def needs_dequant(fmt: str) -> bool:
    return canon(fmt) not in NATIVE


def compute_kind(fmt: str) -> str:
    return FORMATS[canon(fmt)][1]


def canon(fmt: str) -> str:
    f = fmt.strip().lower()
    if f in FORMATS:
        return f
    f2 = re.sub(r"[^a-z0-9]", "", f)
    f2 = ALIASES.get(f, ALIASES.get(f2, f2))
    if f2 in FORMATS:
        return f2
    raise ConfigError(f"precision {fmt!r}: unknown; expected one of {', '.join(FORMATS)}")


def parse_published(text: str) -> str | None:
    """Best reading of a free-text quantization column ('Q4_K_M (GGUF)', '4-bit GPTQ'...); None if unstated."""
    t = text.lower()
    for pat, fmt in ((r"q4_k_m", "q4_k_m"), (r"q5_k_m", "q5_k_m"), (r"q6_k", "q6_k"), (r"q8_0", "q8_0"),
                     (r"q4_0", "q4_0"), (r"iq4_xs", "iq4_xs"), (r"nvfp4", "nvfp4"), (r"q4f16", "q4f16"),
                     (r"gptq", "gptq4"), (r"int8 weights", "int8wo"), (r"online int8", "int8amx"),
                     (r"\bfp8\b", "fp8"), (r"4-bit", "q4f16"), (r"\bf16\b|fp16|bf16", "fp16")):
        if re.search(pat, t):
            return fmt
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
