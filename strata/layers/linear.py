"""The one place every unquantized projection goes through: `linear(x, weight, bias)` and `Linear`.

bf16 CPU tensors with a contiguous weight take the native library's kernels where the library is available:
- below CHUNK_ROWS rows (decode, short prompts), the native GEMM on the bf16 weight in place (`gemm_dq`,
  quant_cpu_gemm.c): at decode a bf16 matmul only streams weights, which torch's bf16 F.linear does at about half
  the read bandwidth; the GEMM streams them in address order a tile ahead (1.2-1.4x `gemv_bf16` at 1-8 rows,
  1.3-1.9x oneDNN at 9-32, weights from memory). A weight of at most GEMV_BF16_MAX_BYTES at up to 16 rows takes
  the GEMV `gemv_bf16` (quant_cpu_gemv16.c) instead: a small model's weights stay in cache, and there the GEMV
  ran 1.2-1.4x faster than the GEMM at 1-8 rows, 1.1-1.3x at 9-16 (benchmarks/decode_step.py). The native
  decoder (cpu_moe.c gemv_once) makes the same choice;
- from CHUNK_ROWS rows on, torch's matmul (oneDNN), which builds a primitive for every new row count it meets,
  0.4-1.5 ms each on one thread, more than the whole matmul of a short prompt on a small model. A small weight
  (SPLIT_MAX_BYTES) therefore gives oneDNN only the whole multiples of CHUNK_ROWS rows and the rest to `gemm_dq`,
  which builds nothing per shape: a server seeing prompts of every length no longer pays for a primitive per
  length.
On the AVX2 build (no AVX-512) the GEMV `gemv_bf16` takes every row count up to AVX2_GEMV_SMALL_MAX_ROWS /
AVX2_GEMV_MAX_ROWS, whatever the weight's size, and torch's float32 matmul the rest (see the constants).
Everything else, and every machine where the library is unavailable, uses F.linear. STRATA_NATIVE_BF16=0 (or
STRATA_NATIVE=0) turns the native paths off, e.g. to compare.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from strata.layers.quant_native import isa, native_lib

# Rows from which oneDNN takes over (below: the native GEMM). The GEMM ran 1.3-1.9x oneDNN at 9-32 rows on OLMoE's
# [2048, 2048] and its [50304, 2048] LM head and about even at 64-70, and 1.1-3x on the bundled model's
# projections at 16-40 rows; oneDNN is ahead from about 128
CHUNK_ROWS = 64
# Weights up to this size (in L2) give oneDNN only the multiples of CHUNK_ROWS rows; larger ones all rows from
# CHUNK_ROWS on: SmolLM2's projections (0.7-3.5 MB) ran 8-12% slower split than in one call (100-400 rows), more
# than a primitive built once per row count costs them.
SPLIT_MAX_BYTES = 512 * 1024
_BF16 = 0  # gemm_dq's kind for plain bf16 weights (quant_native.WEIGHT_KINDS)
# as quant_cpu.h's: weights up to one L2 take the GEMV at up to GEMV_BF16_MAX_ROWS rows (two passes of its 8-row
# groups over a weight that stays in cache)
GEMV_BF16_MAX_BYTES = 1 << 20
GEMV_BF16_MAX_ROWS = 16
# The AVX2 build (no AVX-512 BF16): the GEMV (its own AVX2 kernel, quant_cpu_gemv16_avx2.c) at up to this many rows
# of a weight of at most GEMV_BF16_MAX_BYTES and AVX2_GEMV_MAX_ROWS of a larger one, whatever its size; beyond,
# torch's float32 matmul on the weight widened to float32 per call (its bf16 matmul runs several times slower
# there). benchmarks/bf16_gemv.py (one Zen 3 core, weights from memory; docs/benchmarks/bf16_gemv_avx2.md): the GEMV
# ran 1.1-2.3x the native GEMM (the AVX-512 code on half-width registers) at 4-128 rows; it beat the float32
# matmul up to 8-32 rows on the bundled model's and SmolLM2's small weights, 24-64 on OLMoE's expert weights and
# past 128 on a 49152 x 576 LM head (widened per call: 5.5x slower at 16 rows)
AVX2_GEMV_SMALL_MAX_ROWS = 24
AVX2_GEMV_MAX_ROWS = 48


@lru_cache(maxsize=1)
def bf16_lib():
    """The native library when the bf16 GEMV may be used, else None (cached; `bf16_lib.cache_clear()`)."""
    if os.environ.get("STRATA_NATIVE_BF16", "1") == "0":
        return None
    return native_lib()


@lru_cache(maxsize=1)
def _avx2() -> bool:
    """Whether the kernels are the AVX2 build (see AVX2_GEMV_MAX_ROWS)."""
    return isa() == "avx2"


def native_rows(m: int, n: int, k: int) -> bool:
    """Whether linear() runs m rows through a bf16 weight [n, k] in the native kernels alone (no torch matmul)."""
    if _avx2():
        return m <= (AVX2_GEMV_SMALL_MAX_ROWS if n * k * 2 <= GEMV_BF16_MAX_BYTES else AVX2_GEMV_MAX_ROWS)
    return m < CHUNK_ROWS


def _native_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.is_cpu
        and weight.is_cpu
        and weight.dim() == 2
        and x.dim() >= 1
        and weight.shape[1] == x.shape[-1]
        and weight.is_contiguous()
        and x.numel() > 0
        and (bias is None or bias.is_cpu)
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
    m = x.numel() // k
    if _avx2() and not native_rows(m, n, k):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)
    if m >= CHUNK_ROWS and n * k * weight.element_size() > SPLIT_MAX_BYTES:
        return F.linear(x, weight, bias)  # one call: a second pass over a weight out of cache costs more
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    y = torch.empty(m, n, dtype=torch.bfloat16)  # [M, N]
    b = None if bias is None else bias.float().contiguous()  # the kernel adds fp32 bias before rounding
    bp = None if b is None else b.data_ptr()
    if _avx2() or (m <= GEMV_BF16_MAX_ROWS and n * k * 2 <= GEMV_BF16_MAX_BYTES):
        lib.gemv_bf16(x2.data_ptr(), m, k, weight.data_ptr(), n, bp, y.data_ptr(), 0)
        return y.view(*x.shape[:-1], n)
    head = m // CHUNK_ROWS * CHUNK_ROWS
    if head:  # oneDNN sees multiples of CHUNK_ROWS rows of a small weight: few shapes, each built once
        if bias is None:
            torch.mm(x2[:head], weight.t(), out=y[:head])
        else:
            torch.addmm(bias.to(torch.bfloat16), x2[:head], weight.t(), out=y[:head])
    if head < m:  # the rest (all of a decode step) through the native GEMM, which builds nothing per shape
        lib.gemm_dq(_BF16, x2[head:].data_ptr(), m - head, k, weight.data_ptr(), None, None, n, 0, bp,
                    y[head:].data_ptr())
    return y.view(*x.shape[:-1], n)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) whose forward goes through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
