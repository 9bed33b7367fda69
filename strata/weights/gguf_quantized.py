"""GGUF tensors kept quantized in a Strata format that holds them exactly.

llama.cpp's Q4_0 block is 32 weights `w = d * (q - 8)` with one float16 `d` and 4-bit codes `q`: exactly
Strata's int4-g32 (`w = (q - 8) * s`, float16 scale per 32 inputs). Only the nibble order differs: Q4_0
keeps elements 0..15 in the low nibbles of its 16 bytes and 16..31 in the high ones; int4-gG keeps element
2j in the low nibble of byte j.

Q8_0, Q4_1, Q5_0 and Q5_1 (a scale per 32 inputs, the 5-bit codes, and Q4_1's / Q5_1's float minimum, which
no integer zero point of int4-gG-asym holds) are kept as their blocks, byte for byte, in Strata's
q8_0/q4_1/q5_0/q5_1 (strata/quant/ggml_blocks.py), and the K-quants Q4_K, Q5_K and Q6_K likewise in
q4_k/q5_k/q6_k (strata/quant/kquant.py); their kernels read the blocks as they are. Other types have no exact Strata format and are dequantized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from strata.quant import ggml_blocks, kquant
from strata.quant.format import pack_nibbles

# GGUF type -> the Strata format that holds it exactly
KEPT_FORMATS = {"Q4_0": "int4-g32", **ggml_blocks.GGUF_TYPES, **kquant.GGUF_TYPES}
_Q4_0_BLOCK, _Q4_0_BYTES = 32, 18  # weights per block, bytes per block (fp16 d + 16 bytes of nibbles)


@dataclass
class PackedWeight:
    """A weight in a Strata quantized format, with leading axes like the float tensor it stands for."""

    fmt: str
    qweight: np.ndarray  # uint8 [..., rows, cols/2]
    scales: np.ndarray | None  # float16 [..., rows, cols/32]; None for kept blocks (scales inside)
    shape: tuple[int, ...]  # the float weight's shape [..., rows, cols]

    def __getitem__(self, i: int) -> PackedWeight:
        return PackedWeight(self.fmt, self.qweight[i], None if self.scales is None else self.scales[i], self.shape[1:])

    def map_rows(self, fn: Callable[[np.ndarray], np.ndarray]) -> PackedWeight:
        """The same row reorder applied to codes and scales (rows are whole blocks, so this is exact)."""
        return PackedWeight(self.fmt, fn(self.qweight), None if self.scales is None else fn(self.scales), self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"qweight": torch.from_numpy(np.ascontiguousarray(self.qweight))}
        if self.scales is not None:
            t["scales"] = torch.from_numpy(np.ascontiguousarray(self.scales))
        return t


def q4_0_as_int4_g32(data: np.ndarray, shape: tuple[int, ...]) -> PackedWeight:
    """Q4_0 bytes [..., rows, cols/32*18] -> int4-g32 codes and scales, no value changed."""
    *lead, rows, cols = shape
    blocks = np.ascontiguousarray(data).reshape(-1, _Q4_0_BYTES)  # [N, 18]
    d = blocks[:, :2].copy().view(np.float16).reshape(*lead, rows, cols // _Q4_0_BLOCK)
    qs = blocks[:, 2:]  # [N, 16]
    codes = np.concatenate([qs & 15, qs >> 4], axis=1).reshape(-1, cols)  # [N*32/cols, cols] element order
    packed = pack_nibbles(torch.from_numpy(codes)).numpy().reshape(*lead, rows, cols // 2)
    return PackedWeight(KEPT_FORMATS["Q4_0"], packed, d, tuple(shape))


def _block_module(type_name: str):
    """kquant or ggml_blocks for a type kept as its blocks, else None."""
    return kquant if type_name in kquant.GGUF_TYPES else ggml_blocks if type_name in ggml_blocks.GGUF_TYPES else None


def can_keep(type_name: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor of this type and shape has an exact Strata format (a matrix of whole blocks per row)."""
    if len(shape) < 2:
        return False
    if type_name == "Q4_0":
        return shape[-1] % _Q4_0_BLOCK == 0
    blocks = _block_module(type_name)
    return blocks is not None and shape[-1] % (kquant.QK_K if blocks is kquant else ggml_blocks.QK) == 0


def kept_quantized(type_name: str, data: np.ndarray, shape: tuple[int, ...]) -> PackedWeight | None:
    """The tensor in its exact Strata format, or None when there is none for its type and shape."""
    if not can_keep(type_name, shape):
        return None
    if type_name == "Q4_0":
        return q4_0_as_int4_g32(data, shape)
    blocks = _block_module(type_name)
    kind = blocks.GGUF_TYPES[type_name]
    rows = np.array(data, dtype=np.uint8).reshape(  # a copy: the mapping is read-only
        *shape[:-1], blocks.row_bytes(kind, shape[-1]))
    return PackedWeight(kind, rows, None, tuple(shape))


def has_kept_types(g) -> bool:
    """Whether a GGUFFile has tensors of a type with an exact Strata format (`--model FILE.gguf` then keeps its
    projections quantized)."""
    return any(t.type_name in KEPT_FORMATS for t in g.tensors.values())
