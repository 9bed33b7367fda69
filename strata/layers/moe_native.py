"""Pointer tables that let one native call (moe_decode in cpu_moe.c) run a decode token through a MoE block's
top-k resident experts, instead of a Python loop of module calls and small torch ops per expert.

Applies when every expert is a gated MLP whose gate/up projections are fused (`gate_up_weight` for bf16,
`gate_up_quant` for quantized) and whose down projection has the same format, without biases or padding.
Anything else (experts served by a tier provider, fp32 weights, mixed formats) keeps the Python path.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from strata.layers.linear import Linear, bf16_lib
from strata.layers.quant_linear import QuantLinear

_KINDS = {"bf16": 0, "int8": 1, "fp8": 2, "int8-nested": 3, "int4": 4}  # WK_* in quant_cpu.h


def _quant_ptrs(q: QuantLinear) -> tuple[int, int | None, int | None]:
    k = q._k
    z = k.get("zeros")
    return k["qweight"].data_ptr(), k["scales"].data_ptr(), None if z is None else z.data_ptr()


def _expert_entry(e: nn.Module):
    """(kind, group, in_features, intermediate, gate/up ptrs, down ptrs) of one expert, or None."""
    projections = getattr(e, "_projections", None)
    if projections is None:
        return None
    gate, _, down = projections()
    fused_q, fused_w = getattr(e, "gate_up_quant", None), getattr(e, "gate_up_weight", None)
    if fused_q is not None and type(down) is QuantLinear:
        if fused_q._gemv is None or down._gemv is None or fused_q.bias is not None or down.bias is not None:
            return None
        if fused_q.fmt != down.fmt:
            return None
        return (_KINDS[fused_q.fmt.kind], fused_q.fmt.group_size or 0, fused_q.in_features, down.in_features,
                _quant_ptrs(fused_q), _quant_ptrs(down))
    if fused_w is not None and type(down) in (nn.Linear, Linear) and gate.bias is None and down.bias is None:
        w = down.weight
        if fused_w.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or not w.is_contiguous():
            return None
        return _KINDS["bf16"], 0, fused_w.shape[1], w.shape[1], (fused_w.data_ptr(), None, None), (w.data_ptr(), None, None)
    return None


class NativeExperts:
    """Built once per block from its resident experts; call with one bf16 token."""

    def __init__(self, experts: nn.ModuleList, kind: int, group: int, hidden: int, inter: int, entries: list):
        self.experts = experts  # keeps the tensors behind the pointers alive
        self.kind, self.group, self.hidden, self.inter = kind, group, hidden, inter
        n = len(entries)
        self.tables = [(ctypes.c_void_p * n)(*(e[4 + t // 3][t % 3] for e in entries)) for t in range(6)]

    @classmethod
    def build(cls, experts: nn.ModuleList) -> NativeExperts | None:
        if bf16_lib() is None or len(experts) == 0 or any(p.device.type != "cpu" for p in experts.parameters()):
            return None
        entries = [_expert_entry(e) for e in experts]
        if any(e is None for e in entries) or len({e[:4] for e in entries}) != 1:
            return None
        return cls(experts, *entries[0][:4], entries)

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [1, H] bf16, weights [1, k], ids [1, k] -> [1, H] bf16: sum_j weights_j * expert_{ids_j}(x)."""
        x = x.contiguous()
        out = torch.empty_like(x)
        w = weights[0].float().contiguous()  # [k]
        i = ids[0].to(torch.int64).contiguous()  # [k]
        bf16_lib().moe_decode(self.kind, x.data_ptr(), self.hidden, self.inter, self.group, i.numel(), i.data_ptr(),
                              w.data_ptr(), *self.tables, out.data_ptr())
        return out
