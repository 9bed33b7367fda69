"""llama.cpp's 32-weight blocks Q8_0, Q4_1, Q5_0 and Q5_1 stored as they are, and their reference
dequantization.

A weight `[out, in]` is kept as the GGUF bytes: `qweight` uint8 `[out, in / 32 * B]`, one row of blocks per
output channel, each block covering 32 consecutive inputs in B bytes:

    q8_0  B = 34  d fp16, 32 int8 codes q                                  w = d * q       (8.5 bits/weight)
    q4_1  B = 20  d fp16, m fp16, 16 bytes: low nibbles are weights 0-15,  w = d * q + m   (5 bits/weight)
                  high nibbles weights 16-31
    q5_0  B = 22  d fp16, 4 bytes qh, 16 bytes qs: q = nibble | (bit j    w = d * (q - 16)  (5.5 bits/weight)
                  of qh) << 4 for weight j, nibbles in q4_1's order
    q5_1  B = 24  d fp16, m fp16, qh, qs as q5_0                         w = d * q + m     (6 bits/weight)

llama.cpp's Q4_K_M and Q5_K_M files use Q5_0 / Q5_1 for the tensors whose rows are not a multiple of 256 wide
(the K-quants' super-block), so small models (SmolLM2-135M's 576) hold most of their weights in them.

None fits an older Strata format: int8 has one scale per row, int4 holds 4-bit codes, and int4-g32-asym's
zero point is an integer code (w = (q - z) * s), which cannot hold a float minimum. (Q4_0, `w = d * (q - 8)`,
is exactly int4-g32 and converts to it: gguf_quantized.py.) `dequantize` follows the arithmetic of
`gguf.quants` (float32, the same operations in the same order), so both give identical values.
"""

from __future__ import annotations

import torch

from strata.errors import WeightsError

QK = 32  # weights per block
BLOCK_BYTES = {"q8_0": 34, "q4_1": 20, "q5_0": 22, "q5_1": 24}
GGUF_TYPES = {"Q8_0": "q8_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1"}
HAS_MIN = ("q4_1", "q5_1")  # blocks with an fp16 minimum m after d  # GGMLQuantizationType name -> Strata format


def row_bytes(kind: str, in_features: int) -> int:
    """Bytes of one output channel (whole blocks; check_width refuses widths that are not)."""
    return -(-in_features // QK) * BLOCK_BYTES[kind]


def check_width(kind: str, in_features: int, name: str = "weight") -> None:
    if in_features % QK:
        raise WeightsError(f"{name}: format {kind} needs in_features to be a multiple of {QK}, got {in_features}")


def _f16(b: torch.Tensor) -> torch.Tensor:  # [n, 2] uint8 -> [n, 1] float32
    return b.contiguous().view(torch.float16).float()


def dequantize(qweight: torch.Tensor, kind: str, out_features: int, in_features: int) -> torch.Tensor:
    """uint8 [out, in / 32 * B] -> float32 [out, in], as gguf.quants.dequantize computes it."""
    blocks = qweight.reshape(-1, BLOCK_BYTES[kind])  # [out * in / 32, B]
    d = _f16(blocks[:, 0:2])  # [n, 1]
    if kind == "q8_0":
        return (blocks[:, 2:].contiguous().view(torch.int8).float() * d).reshape(out_features, in_features)
    qs = blocks[:, -16:]  # [n, 16] the last 16 bytes of every 4- and 5-bit block
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).int()  # [n, 32] weight order
    if kind != "q4_1":
        qh = blocks[:, -20:-16].int()  # [n, 4] little-endian bytes of a uint32: bit j is weight j's
        bits = (qh.repeat_interleave(8, dim=1) >> torch.arange(8).repeat(4)) & 1  # [n, 32]
        q = q | (bits << 4)
    if kind == "q5_0":
        w = d * (q - 16).float()
    else:
        w = d * q.float() + _f16(blocks[:, 2:4])
    return w.reshape(out_features, in_features)


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0, scale: float = 1e-2) -> torch.Tensor:
    """uint8 [rows, cols / 32 * B] of random valid blocks (tests, benchmarks): random codes, fp16 d (and m)
    uniform in [-scale, scale] (m in [-8 scale, 0], as llama.cpp's quantizer makes it: the block minimum)."""
    check_width(kind, cols)
    g = torch.Generator().manual_seed(seed)
    nb = rows * cols // QK
    raw = torch.randint(0, 256, (nb, BLOCK_BYTES[kind]), dtype=torch.uint8, generator=g)
    factors = [(0, 2 * scale, -scale)] + ([(2, -8 * scale, 0.0)] if kind in HAS_MIN else [])
    for off, span, low in factors:
        v = (torch.rand(nb, generator=g, dtype=torch.float64) * span + low).to(torch.float16)
        raw[:, off : off + 2] = v.view(torch.uint8).view(nb, 2)
    return raw.view(rows, -1)
