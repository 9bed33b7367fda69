"""Fuses projections that read the same input (q/k/v; gate/up) into one contiguous weight, after loading.

The separate nn.Linear weights become views into the fused tensor, so checkpoint names and state_dict keys are
unchanged and no memory is doubled; forward then does one matmul instead of two or three. This also moves the
weights out of the safetensors mapping into 64-byte-aligned memory. Meta (offloaded) weights are left alone.

Quantized projections of one format (native kernels) fuse the same way by rows, into a QuantLinear whose
buffers the separate layers then view (`fuse_quantized`): one GEMV call instead of three at decode, where the
fixed cost per call (Python, ctypes, an OpenMP fork/join) is a visible share of a token.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from strata.layers.linear import Linear, linear
from strata.layers.quant_linear import QuantLinear
from strata.layers.quant_native import WEIGHT_KINDS
from strata.mapping import file_ranges, libc, page_range


def _fusable(linears: list[nn.Module]) -> bool:
    if not all(type(m) in (nn.Linear, Linear) for m in linears):
        return False
    w0 = linears[0].weight
    if w0.is_meta or any(m.weight.is_meta or m.weight.dtype != w0.dtype for m in linears):
        return False
    has_bias = [m.bias is not None for m in linears]
    return all(has_bias) or not any(has_bias)


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim the range now; contents are kept (re-read from the file if touched)
_file_ranges: list[tuple[int, int]] = []  # file-backed mappings of this process, set by fuse_model


def release_pages(t: torch.Tensor, ranges: list[tuple[int, int]] | None = None) -> None:
    """Ask the kernel to reclaim the whole pages under `t`, a weight just copied into a fused tensor, when `t`
    lies in a file mapping (a view of a safetensors file).

    Once copied, those pages still count in RSS for as long as the mapping lives (other tensors of the shard
    keep it): a resident MoE held its fused gate/up weights twice (measured: 11 GiB RSS for a 6.6 GiB model,
    docs/benchmarks/tiers.md). MADV_PAGEOUT keeps the contents (re-read from the file if touched); anonymous
    memory is left alone (it would only be swapped out before being freed); unsupported systems do nothing.
    `ranges`: the process's file mappings (mapping.file_ranges()), default the table fuse_model sets.
    """
    lib = libc()
    span = page_range(t, _file_ranges if ranges is None else ranges) if lib is not None else None
    if span is not None:
        lib.madvise(ctypes.c_void_p(span[0]), ctypes.c_size_t(span[1] - span[0]), _MADV_PAGEOUT)


def fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Returns (weight [sum(out), in], bias [sum(out)] or None) with each linear's params now views of it."""
    if not _fusable(linears):
        return None
    w0 = linears[0].weight
    weight = torch.empty(sum(m.out_features for m in linears), w0.shape[1], dtype=w0.dtype)
    bias = None if linears[0].bias is None else torch.empty(weight.shape[0], dtype=linears[0].bias.dtype)
    start = 0
    for m in linears:
        end = start + m.out_features
        weight[start:end].copy_(m.weight)
        release_pages(m.weight)
        m.weight = nn.Parameter(weight[start:end], requires_grad=False)
        if bias is not None:
            bias[start:end].copy_(m.bias)
            m.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return weight, bias


def fuse_quantized(linears: list[nn.Module]) -> QuantLinear | None:
    """One QuantLinear over the concatenated rows of `linears` (same format and input, native backend), whose
    buffers each linear's now view; None when they cannot fuse. The result is not registered as a submodule by
    its callers: the separate layers keep owning the state-dict names."""
    if not all(type(m) is QuantLinear and m.backend == "native" for m in linears):
        return None
    first = linears[0]
    if any(m.fmt != first.fmt or m.in_features != first.in_features for m in linears):
        return None
    if len({m.bias is None for m in linears}) > 1 or any(m.bias is not None and m.bias.is_meta for m in linears):
        return None
    names = list(first.fmt.tensor_specs(1, 1))
    if any(getattr(m, n).is_meta for m in linears for n in names):
        return None
    fused = QuantLinear(first.in_features, sum(m.out_features for m in linears), first.fmt,
                        bias=first.bias is not None, dtype=first.bias.dtype if first.bias is not None else torch.bfloat16)
    fused.module_name = "+".join(m.module_name for m in linears)
    for n in [*names, *(["bias"] if first.bias is not None else [])]:
        whole = torch.cat([getattr(m, n) for m in linears])  # [sum(out), ...]
        for m in linears:
            release_pages(getattr(m, n))
        setattr(fused, n, whole)
        start = 0
        for m in linears:
            setattr(m, n, whole[start : start + m.out_features])
            start += m.out_features
    for m in [*linears, fused]:
        m.post_load("native")
    return fused


class FusedProjection:
    """Projections that read the same input (q/k/v; gate/up) as one: a float weight [sum(out), in] (+ bias) or a
    QuantLinear over the same rows. Not an nn.Module: the separate layers keep the state-dict names, and their
    tensors are views of this one's."""

    def __init__(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 quant: QuantLinear | None = None):
        self.weight, self.bias, self.quant = weight, bias, quant

    @property
    def in_features(self) -> int:
        return self.quant.in_features if self.quant is not None else self.weight.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, sum(out)]
        return self.quant(x) if self.quant is not None else linear(x, self.weight, self.bias)


def fuse_projection(linears: list[nn.Module]) -> FusedProjection | None:
    """`fuse` for float weights, else `fuse_quantized`; None when neither applies."""
    fused = fuse(linears)
    if fused is not None:
        return FusedProjection(*fused)
    quant = fuse_quantized(linears)
    return None if quant is None else FusedProjection(quant=quant)


def native_weight(proj) -> tuple[int, int, int, int | None, int | None] | None:
    """(kind code WK_* of quant_cpu.h, group size, weight, scales, zero-point pointers) for a projection the
    native one-row kernels read as it is: a FusedProjection, a QuantLinear with its bound GEMV, or an unbiased
    bf16 Linear; None for anything else (biases, padding, other dtypes)."""
    if isinstance(proj, FusedProjection):
        proj = proj.quant if proj.quant is not None else proj.weight if proj.bias is None else None
    if type(proj) is QuantLinear:
        if proj._gemv is None or proj.bias is not None:
            return None
        k = proj._k
        z = k.get("zeros")
        s = k.get("scales")  # K-quant blocks carry their scales inside qweight
        return (WEIGHT_KINDS[proj.fmt.kind], proj.fmt.group_size or 0, k["qweight"].data_ptr(),
                None if s is None else s.data_ptr(), None if z is None else z.data_ptr())
    if type(proj) in (nn.Linear, Linear):
        proj = proj.weight if proj.bias is None else None
    if isinstance(proj, torch.Tensor) and proj.dtype == torch.bfloat16 and proj.is_contiguous():
        return WEIGHT_KINDS["bf16"], 0, proj.data_ptr(), None, None
    return None


def fuse_model(model: nn.Module) -> int:
    """Fuse every attention's q/k/v and every MLP's gate/up (experts included). Returns the number fused."""
    global _file_ranges
    _file_ranges = file_ranges()
    n = 0
    try:
        for m in model.modules():
            fuse_fn = getattr(m, "fuse_projections", None)
            if callable(fuse_fn) and fuse_fn():
                n += 1
    finally:
        _file_ranges = []
    return n
