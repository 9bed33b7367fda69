"""Int8 activation quantization, the reference of the int8-activation kernels (quant_cpu_a8.c).

Each row is cut into blocks of 32 consecutive values (the last one zero-padded); a block keeps a float32
scale d = max|x| / 127 and int8 codes q = round(x * (1 / d)) (ties to even), as llama.cpp's Q8_0 does. The
kernels compute with exactly these codes, so a float matmul of the dequantized weight with `dequantize(q, d)`
is their reference up to float32 summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACT_BLOCK = 32  # activation values per scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x float [M, K] -> codes int8 [M, Kb] and scales float32 [M, Kb / 32] (Kb = K rounded up to 32)."""
    m, k = x.shape
    xb = F.pad(x.float(), (0, -k % ACT_BLOCK)).reshape(m, -1, ACT_BLOCK)  # [M, Kb/32, 32]
    d = xb.abs().amax(dim=-1) / 127.0  # [M, Kb/32]
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv.unsqueeze(-1)).to(torch.int8)
    return q.reshape(m, -1), d


def fake_quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """x float [M, K] -> float32 [M, K]: the values the int8-activation kernels compute with."""
    m, k = x.shape
    q, d = quantize_rows(x)
    return (q.float().reshape(m, -1, ACT_BLOCK) * d.unsqueeze(-1)).reshape(m, -1)[:, :k]
