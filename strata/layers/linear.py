"""The one place every unquantized projection goes through: `linear(x, weight, bias)` and `Linear`.

At decode (a few activation rows) a bf16 matmul only streams weights, and torch's bf16 F.linear on CPU
reaches about half the read bandwidth there. With bf16 CPU tensors, at most MAX_ROWS rows and a contiguous
weight, `linear` calls the native library's GEMM on the bf16 weight in place (`gemm_dq`, quant_cpu_gemm.c)
instead; everything else, and every machine where the library is unavailable, uses F.linear. STRATA_NATIVE_BF16=0
(or STRATA_NATIVE=0) turns the native path off, e.g. to compare.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from strata.layers.quant_native import native_lib

# Rows up to which the native GEMM beat oneDNN's bf16 matmul, one thread, weights from memory: 1.3-1.9x at 9-32
# rows on OLMoE's [2048, 2048] and its [50304, 2048] LM head, even at 64-70, oneDNN ahead by 128; and 1.2-1.4x
# faster than gemv_bf16 at 1-8 rows (it streams the weight in address order, a tile ahead)
MAX_ROWS = 64
_BF16 = 0  # gemm_dq's kind for plain bf16 weights (quant_native.WEIGHT_KINDS)


@lru_cache(maxsize=1)
def bf16_lib():
    """The native library when the bf16 GEMV may be used, else None (cached; `bf16_lib.cache_clear()`)."""
    if os.environ.get("STRATA_NATIVE_BF16", "1") == "0":
        return None
    return native_lib()


def _native_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and x.dim() >= 1
        and weight.shape[1] == x.shape[-1]
        and weight.is_contiguous()
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and x.numel() > 0
        and (bias is None or bias.device.type == "cpu")
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias [N]) -> [..., N], like F.linear."""
    if not _native_ok(x, weight, bias):
        return F.linear(x, weight, bias)
    lib = bf16_lib()
    if lib is None:
        return F.linear(x, weight, bias)
    n, k = weight.shape
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    y = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)  # [M, N]
    b = None if bias is None else bias.float().contiguous()  # the kernel adds fp32 bias before rounding
    lib.gemm_dq(_BF16, x2.data_ptr(), x2.shape[0], k, weight.data_ptr(), None, None, n, 0,
                None if b is None else b.data_ptr(), y.data_ptr())
    return y.view(*x.shape[:-1], n)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) whose forward goes through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
