"""Int8 activation quantization, the reference of the int8-activation kernels (quant_cpu_a8.c).

Each row is cut into blocks of consecutive values (the last one zero-padded); a block keeps a float32 scale
d = max|x| / 127 and int8 codes q = round(x * (1 / d)) (ties to even). Blocks are 32 values (llama.cpp's Q8_0)
for most formats and 256 for the K-quants (Q8_K: one scale per super-block, which lets their kernel keep the
sums in integers); ACT_BLOCKS says which. The kernels compute with exactly these codes, so a float matmul of
the dequantized weight with `fake_quantize_rows(x, block)` is their reference up to float32 summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACT_BLOCK = 32  # activation values per scale
ACT_BLOCKS = {"q4_k": 256, "q5_k": 256, "q6_k": 256}  # format family -> its block when not ACT_BLOCK


def block_for(kind: str) -> int:
    """Activation values per scale for weights of format family `kind`."""
    return ACT_BLOCKS.get(kind, ACT_BLOCK)


def quantize_rows(x: torch.Tensor, block: int = ACT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x float [M, K] -> codes int8 [M, Kb] and scales float32 [M, Kb / block] (Kb = K rounded up to block)."""
    m, k = x.shape
    xb = F.pad(x.float(), (0, -k % block)).reshape(m, -1, block)  # [M, Kb/block, block]
    d = xb.abs().amax(dim=-1) / 127.0  # [M, Kb/block]
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv.unsqueeze(-1)).to(torch.int8)
    return q.reshape(m, -1), d


def fake_quantize_rows(x: torch.Tensor, block: int = ACT_BLOCK) -> torch.Tensor:
    """x float [M, K] -> float32 [M, K]: the values the int8-activation kernels compute with."""
    m, k = x.shape
    q, d = quantize_rows(x, block)
    return (q.float().reshape(m, -1, block) * d.unsqueeze(-1)).reshape(m, -1)[:, :k]
