"""Fuses projections that read the same input (q/k/v; gate/up) into one contiguous weight, after loading.

The separate nn.Linear weights become views into the fused tensor, so checkpoint names and state_dict keys are
unchanged and no memory is doubled; forward then does one matmul instead of two or three. This also moves the
weights out of the safetensors mapping into 64-byte-aligned memory. Quantized or meta (offloaded) weights are
left alone.
"""

from __future__ import annotations

import torch
from torch import nn

from strata.layers.linear import Linear


def _fusable(linears: list[nn.Module]) -> bool:
    if not all(type(m) in (nn.Linear, Linear) for m in linears):
        return False
    w0 = linears[0].weight
    if w0.is_meta or any(m.weight.is_meta or m.weight.dtype != w0.dtype for m in linears):
        return False
    has_bias = [m.bias is not None for m in linears]
    return all(has_bias) or not any(has_bias)


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
        m.weight = nn.Parameter(weight[start:end], requires_grad=False)
        if bias is not None:
            bias[start:end].copy_(m.bias)
            m.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return weight, bias


def fuse_model(model: nn.Module) -> int:
    """Fuse every attention's q/k/v and every MLP's gate/up (experts included). Returns the number fused."""
    n = 0
    for m in model.modules():
        fuse_fn = getattr(m, "fuse_projections", None)
        if callable(fuse_fn) and fuse_fn():
            n += 1
    return n
