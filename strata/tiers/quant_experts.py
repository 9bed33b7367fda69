"""Quantized routed experts in the tiers: an expert module bound to the quantized tensors of a cache slot.

A quantized checkpoint's experts reach the store as they are on disk (`qweight`, `scales`[, `zeros`] per
linear, formats of quant/format.py), so a slot holds the quantized bytes and nothing else. To run
one, `bind_expert` copies the block's meta-device expert module (its QuantLinears carry the expert's own
format, which differs between experts of a `--mixed` plan), points every QuantLinear's buffers at the
slot's tensors (views, no copy) and calls `post_load`, which binds the native kernels to those pointers:
the same kernels a resident load uses, on the same bytes. The cache keeps the bound module with the slot
until the slot is read again (cache.py), so an expert is bound once per read, not once per token; the
next read into that slot rebinds the same module when the formats match, instead of copying the module
again.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from strata.layers.quant_linear import QuantLinear
from strata.tiers.store import StoreError


def is_quantized(module: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in module.modules())


def _signature(module: nn.Module) -> tuple:
    """What must match for one bound module to be rebound to another expert: each linear's format and bias."""
    return tuple((n, str(m.fmt), m.bias is not None)
                 for n, m in module.named_modules() if isinstance(m, QuantLinear))


def bind_expert(proto: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                reuse: nn.Module | None = None) -> nn.Module:
    """The expert `proto` (on meta) computing from `tensors` (the slot's views, by name). `reuse`: a module
    bound earlier to the same slot; when its formats match it is rebound (no copy of the module)."""
    sig = _signature(proto)
    same = reuse is not None and getattr(reuse, "_bound_signature", None) == sig
    module = reuse if same else copy.deepcopy(proto)
    module._bound_signature = sig
    for name, lin in module.named_modules():
        if not isinstance(lin, QuantLinear):
            continue
        names = [*lin.fmt.tensor_specs(1, 1), *(["bias"] if lin.bias is not None else [])]
        for suffix in names:
            t = tensors.get(f"{name}.{suffix}")
            if t is None:
                raise StoreError(f"expert tensor {name}.{suffix}: not in the store (found {sorted(tensors)}); "
                                 "the store does not match the checkpoint's quantization_config, reconvert it")
            setattr(lin, suffix, t.to(dtype) if suffix == "bias" else t)
        lin.post_load()
    quant = {n for n, m in proto.named_modules() if isinstance(m, QuantLinear)}
    floats = [k for k, v in proto.state_dict(keep_vars=True).items()
              if v.is_meta and k.rpartition(".")[0] not in quant]
    if floats:  # float tensors of a partly quantized expert: cast to the compute dtype
        module.load_state_dict({k: tensors[k].to(dtype) for k in floats}, strict=False, assign=True)
    return module


def expert_binder(blocks, dtype: torch.dtype) -> Callable[[tuple[int, int], dict, object], object] | None:
    """The cache's `bind` for a model whose routed experts are (some of them) quantized; None if none is."""
    protos = {b.layer_idx: b.experts for b in blocks}
    quantized = {(layer, i) for layer, experts in protos.items()
                 for i, e in enumerate(experts) if is_quantized(e)}
    if not quantized:
        return None

    def bind(key: tuple[int, int], tensors: dict[str, torch.Tensor], previous: object) -> object:
        if key not in quantized:
            return tensors
        reuse = previous if isinstance(previous, nn.Module) else None
        return bind_expert(protos[key[0]][key[1]], tensors, dtype, reuse)

    return bind
