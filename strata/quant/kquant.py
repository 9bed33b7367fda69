"""llama.cpp's K-quant blocks (Q4_K, Q5_K, Q6_K) stored as they are, and their reference dequantization.

A K-quant weight `[out, in]` is kept as the GGUF bytes: `qweight` uint8 `[out, in / 256 * B]`, one row of
super-blocks per output channel, each super-block covering 256 consecutive inputs in B bytes:

    q4_k  B = 144  d fp16, dmin fp16, 12 bytes of 6-bit scales sc[8] and mins m[8], 128 bytes of nibbles
                   w = d * sc[j] * q - dmin * m[j] for sub-block j of 32 weights          (4.5 bits/weight)
    q5_k  B = 176  as q4_k, then 32 bytes of fifth bits before the nibbles: q in 0..31     (5.5 bits/weight)
    q6_k  B = 210  128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, d fp16
                   w = d * sc[g] * (q - 32) for group g of 16 weights, q in 0..63         (6.5625 bits/weight)

Inside a super-block, the 128 nibble bytes are 4 chunks of 32: chunk c holds sub-block 2c in its low nibbles
and 2c + 1 in its high nibbles (q5_k: bit 2c / 2c + 1 of the fifth-bit byte at the same position). q6_k
works in two halves of 128 weights, each from 64 nibble bytes and 32 high bytes: sub-blocks 0..3 of a half
are the low nibbles of bytes 0-31, of bytes 32-63, then the high nibbles of each, with bits 0-1, 2-3, 4-5,
6-7 of the high byte as their top two bits. `dequantize` follows the arithmetic of `gguf.quants` exactly
(float32, same operation order), so both give identical values.
"""

from __future__ import annotations

import torch

from strata.errors import WeightsError

QK_K = 256  # weights per super-block
BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
GGUF_TYPES = {"Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k"}  # GGMLQuantizationType name -> Strata format


def row_bytes(kind: str, in_features: int) -> int:
    """Bytes of one output channel (whole super-blocks; check_width refuses widths that are not)."""
    return -(-in_features // QK_K) * BLOCK_BYTES[kind]


def check_width(kind: str, in_features: int, name: str = "weight") -> None:
    if in_features % QK_K:
        raise WeightsError(f"{name}: format {kind} needs in_features to be a multiple of {QK_K}, got {in_features}")


def _f16(b: torch.Tensor) -> torch.Tensor:  # [n, 2] uint8 -> [n, 1] float32
    return b.contiguous().view(torch.float16).float()


def _scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes [n, 12] -> 6-bit scales and mins [n, 8] each (float32)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:  # [n, 128] -> [n, 8, 32]: sub-block 2c low, 2c + 1 high
    qs = qs.reshape(-1, 4, 1, 32)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)


def _dequant_q45(blocks: torch.Tensor, five: bool) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = _scale_min(blocks[:, 4:16])
    q = _nibbles(blocks[:, 48:176] if five else blocks[:, 16:144])  # [n, 8, 32]
    if five:
        qh = blocks[:, 16:48].reshape(-1, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
        q = q | ((qh & 1) << 4)
    scale = (d * sc).view(n, 8, 1)
    offset = (dmin * mn).view(n, 8, 1)
    return (scale * q.float() - offset).reshape(n, QK_K)


def _dequant_q6(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(-1, 2, 1, 64)
    ql = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(-1, 2, 4, 32)  # per half: bytes 0-31, 32-63, then highs
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    q = (ql | ((qh & 3) << 4)).to(torch.int8) - 32  # [n, 2, 4, 32]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16]
    scale = (_f16(blocks[:, 208:210]) * scales).view(n, 16, 1)
    return (scale * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


def dequantize(qweight: torch.Tensor, kind: str, out_features: int, in_features: int) -> torch.Tensor:
    """uint8 [out, in / 256 * B] -> float32 [out, in], as gguf.quants.dequantize computes it."""
    blocks = qweight.reshape(-1, BLOCK_BYTES[kind])  # [out * in / 256, B]
    w = _dequant_q6(blocks) if kind == "q6_k" else _dequant_q45(blocks, kind == "q5_k")
    return w.reshape(out_features, in_features)


_FACTOR_AT = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}  # byte offsets of the fp16 d (and dmin)


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0, scale: float = 1e-3) -> torch.Tensor:
    """uint8 [rows, cols / 256 * B] of random valid blocks (tests, benchmarks): random codes and scales, fp16
    factors uniform in [-scale, scale]. Strata makes no K-quant blocks from float weights."""
    check_width(kind, cols)
    g = torch.Generator().manual_seed(seed)
    nb = rows * cols // QK_K
    raw = torch.randint(0, 256, (nb, BLOCK_BYTES[kind]), dtype=torch.uint8, generator=g)
    for off in _FACTOR_AT[kind]:
        d = ((torch.rand(nb, generator=g, dtype=torch.float64) * 2 - 1) * scale).to(torch.float16)
        raw[:, off : off + 2] = d.view(torch.uint8).view(nb, 2)
    return raw.view(rows, -1)
