"""Checks on checkpoint tensors as they load: a checkpoint that disagrees with its config.json, or holds
values no trained model has, is refused with one line instead of giving silently wrong output."""

from __future__ import annotations

import re

import torch

from strata.config import ModelConfig
from strata.errors import WeightsError

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_layer_count(file: str, name: str, cfg: ModelConfig) -> None:
    """A tensor of a layer beyond num_hidden_layers: config.json lists fewer layers than the checkpoint holds
    (loading only the first ones would run a truncated model)."""
    m = _LAYER.search(name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        raise WeightsError(
            f"{file}: tensor '{name}' belongs to layer {m.group(1)}, but {cfg.source} says num_hidden_layers="
            f"{cfg.num_hidden_layers}; set num_hidden_layers to the checkpoint's layer count"
        )


def check_dtype(file: str, name: str, t: torch.Tensor, want: torch.Tensor) -> None:
    """Integer or bool data where the model holds floating-point weights (not a quantized tensor's codes:
    those are declared integer in the model too)."""
    if want.is_floating_point() and not t.is_floating_point():
        raise WeightsError(f"{file}: tensor '{name}' has dtype {str(t.dtype).removeprefix('torch.')}, "
                           "expected a floating-point tensor")


def check_finite_values(file: str, name: str, t: torch.Tensor) -> None:
    """NaN or inf anywhere in a floating-point tensor. One sum in the tensor's own dtype (NaN and inf propagate
    to it); only a sum that is not finite, which a large float16 tensor can also give by overflow, is followed
    by the exact count (an elementwise isfinite over the whole tensor, a slower pass)."""
    if t.is_floating_point() and t.numel() and not torch.isfinite(_sum(t)):
        bad = int((~torch.isfinite(t.float() if t.element_size() == 1 else t)).sum())
        if bad:
            raise WeightsError(f"{file}: tensor '{name}' holds {bad} NaN/inf values (corrupt or diverged weights; "
                               "--no-check-weights loads it anyway)")


def _sum(t: torch.Tensor) -> torch.Tensor:
    """The tensor's sum; float8 has no sum kernel, so its values are summed in float16 chunks of 16M."""
    if t.element_size() != 1:
        return t.sum()
    flat = t.reshape(-1)
    return sum((flat[i : i + (1 << 24)].to(torch.float16).sum() for i in range(0, flat.numel(), 1 << 24)),
               torch.zeros((), dtype=torch.float16))
