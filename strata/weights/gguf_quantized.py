"""GGUF tensors kept quantized in a Strata format that holds them exactly.

llama.cpp's Q4_0 block is 32 weights `w = d * (q - 8)` with one float16 `d` and 4-bit codes `q`: exactly
Strata's int4-g32 (`w = (q - 8) * s`, float16 scale per 32 inputs). Only the nibble order differs: Q4_0
keeps elements 0..15 in the low nibbles of its 16 bytes and 16..31 in the high ones; int4-gG keeps element
2j in the low nibble of byte j. Other types have no exact Strata format yet (Q8_0's scale is per 32 inputs,
Strata's int8 per row; Q4_1 adds a float minimum) and are dequantized instead.

The K-quants Q4_K, Q5_K and Q6_K are kept as their blocks, byte for byte, in Strata's q4_k/q5_k/q6_k
(strata/quant/kquant.py), whose kernels read them as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from strata.quant.format import pack_nibbles
from strata.quant.kquant import BLOCK_BYTES, GGUF_TYPES, QK_K

KEPT_FORMATS = {"Q4_0": "int4-g32", **GGUF_TYPES}  # GGUF type -> the Strata format that holds it exactly
_Q4_0_BLOCK, _Q4_0_BYTES = 32, 18  # weights per block, bytes per block (fp16 d + 16 bytes of nibbles)


@dataclass
class PackedWeight:
    """A weight in a Strata quantized format, with leading axes like the float tensor it stands for."""

    fmt: str
    qweight: np.ndarray  # uint8 [..., rows, cols/2]
    scales: np.ndarray | None  # float16 [..., rows, cols/32]; None for K-quants (scales inside the blocks)
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


def kept_quantized(type_name: str, data: np.ndarray, shape: tuple[int, ...]) -> PackedWeight | None:
    """The tensor in its exact Strata format, or None when there is none for its type and shape."""
    if type_name == "Q4_0" and len(shape) >= 2 and shape[-1] % _Q4_0_BLOCK == 0:
        return q4_0_as_int4_g32(data, shape)
    kind = GGUF_TYPES.get(type_name)
    if kind is not None and len(shape) >= 2 and shape[-1] % QK_K == 0:
        rows = np.array(data, dtype=np.uint8).reshape(  # a copy: the mapping is read-only
            *shape[:-1], shape[-1] // QK_K * BLOCK_BYTES[kind])
        return PackedWeight(kind, rows, None, tuple(shape))
    return None


def has_kquants(g) -> bool:
    """Whether a GGUFFile has K-quant tensors (`--model FILE.gguf` then keeps its projections quantized)."""
    return any(t.type_name in GGUF_TYPES for t in g.tensors.values())
