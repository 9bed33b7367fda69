"""Pointer tables that let one native call (moe_decode_batch in cpu_moe.c) run a batch of tokens through a MoE
block's resident experts, grouped by expert (each routed expert's weights stream once per call), instead of a
Python loop of module calls and small torch ops per expert.

Applies when every expert is a gated MLP whose gate/up projections are fused (`gate_up_fused`) and whose down
projection has the same format, as `fusion.native_weight` describes them (no biases or padding).
Experts served by a tier provider (`from_slots`) qualify when their cache slots hold bf16 tensors with the gate
rows directly followed by the up rows (the store keeps an expert's tensors in name order: gate_proj, up_proj);
the table then points into the slots the provider holds for the call.
Anything else (fp32 weights, mixed formats, quantized or cast tier experts) keeps the Python path.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from strata.layers.fusion import WEIGHT_KINDS, native_weight
from strata.layers.linear import bf16_lib
from strata.layers.quant_linear import GEMV_MAX_ROWS

# Rows of one expert up to which the grouped call is no slower than the expert module, by weight kind. Beyond 4
# rows (from 1 row for bf16) the grouped call runs the GEMM of quant_cpu_gemm.c (the AVX2 build: bf16 on its GEMV,
# cpu_moe.c gemv_once), as a quantized module does up to its gemm_max_rows (a bf16 one calls oneDNN), and it saves
# the module's torch ops per expert. Measured with
# benchmarks/moe_dispatch.py: one OLMoE-shaped expert (hidden 2048, intermediate 1024), 1 thread, weights read from
# memory: no slower at every count up to 64, the most it measures, for every kind; bf16 alone, weights in cache:
# no slower up to 128 rows, 1.06x slower at 192, 1.2x at 256. SparseMoeBlock sends an expert of a step above
# NATIVE_MAX_TOKENS rows to the grouped call when it got at most max_rows rows; kinds not measured keep the
# module's own GEMV switch.
NATIVE_ROWS = {"bf16": 128, "int4": 64, "int8": 64, "q4_k": 64}
# Smaller experts stay ahead longer (the module's overhead per call weighs more against a shorter GEMM): up to
# NATIVE_WORK rows x weight elements (OLMoE's expert at NATIVE_ROWS), at most NATIVE_MAX_ROWS. The bundled model's
# expert (hidden 160, intermediate 256) was no slower up to 192 rows alone, 1.2x slower at 512.
NATIVE_WORK = {"bf16": 128 * 3 * 2048 * 1024}
NATIVE_MAX_ROWS = 256
_KIND_NAMES = {code: name for name, code in WEIGHT_KINDS.items()}


def _expert_entry(e: nn.Module):
    """(kind, group, in_features, intermediate, gate/up pointers, down pointers) of one expert, or None."""
    projections, fused = getattr(e, "_projections", None), getattr(e, "gate_up_fused", None)
    if projections is None or fused is None:
        return None
    down = projections()[2]
    gu, d = native_weight(fused), native_weight(down)
    if gu is None or d is None or gu[:2] != d[:2]:  # same kind and group size for both
        return None
    return (*gu[:2], fused.in_features, down.in_features, gu[2:], d[2:])


def _slot_entry(names: tuple[str, str, str], tensors: object):
    """The entry of one tier expert from its slot's tensors (by checkpoint name), or None."""
    if not isinstance(tensors, dict) or len(tensors) != 3:  # a bound quantized module, or biases
        return None
    gate, up, down = (tensors.get(f"{n}.weight") for n in names)
    if any(t is None or t.dtype != torch.bfloat16 or not t.is_contiguous() for t in (gate, up, down)):
        return None
    if gate.shape != up.shape or up.data_ptr() != gate.data_ptr() + gate.numel() * gate.element_size():
        return None  # the kernel reads gate/up as one [2I, H] weight
    return (0, 0, gate.shape[1], gate.shape[0], (gate.data_ptr(), None, None), (down.data_ptr(), None, None))


class NativeExperts:
    """Built once per block from its resident experts, or per step from a tier's held slots (`from_slots`); call
    with a few bf16 tokens (decode batches, verifications)."""

    def __init__(self, experts: object, kind: int, group: int, hidden: int, inter: int, entries: list):
        self.experts = experts  # keeps the tensors behind the pointers alive
        self.kind, self.group, self.hidden, self.inter = kind, group, hidden, inter
        name = _KIND_NAMES[kind]
        # per expert, in steps of many rows
        self.max_rows = max(NATIVE_ROWS.get(name, GEMV_MAX_ROWS),
                            min(NATIVE_MAX_ROWS, NATIVE_WORK.get(name, 0) // (3 * hidden * inter)))
        self.num_experts = n = len(entries)  # entries of experts a call does not route to may be None
        self.tables = [(ctypes.c_void_p * n)(*(e[4 + t // 3][t % 3] if e else None for e in entries))
                       for t in range(6)]

    @classmethod
    def build(cls, experts: nn.ModuleList) -> NativeExperts | None:
        if bf16_lib() is None or len(experts) == 0 or any(p.device.type != "cpu" for p in experts.parameters()):
            return None
        entries = [_expert_entry(e) for e in experts]
        if any(e is None for e in entries) or len({e[:4] for e in entries}) != 1:
            return None
        return cls(experts, *entries[0][:4], entries)

    @classmethod
    def from_slots(cls, proto: nn.Module, held: dict[int, object], num_experts: int) -> NativeExperts | None:
        """proto: the block's (meta) expert module; held: {expert id: its slot's tensors by name}, every expert
        the call routes to, kept resident by the caller until the call returns."""
        projections = getattr(proto, "_projections", None)
        if bf16_lib() is None or projections is None or getattr(proto, "act_fn", None) is not F.silu or not held:
            return None
        name_of = {id(m): n for n, m in proto.named_modules()}
        names = tuple(name_of.get(id(m)) for m in projections())
        entries: list = [None] * num_experts
        for e, tensors in held.items():
            entries[e] = _slot_entry(names, tensors)
            if entries[e] is None:
                return None
        first = entries[next(iter(held))]
        if any(e is not None and e[:4] != first[:4] for e in entries):
            return None
        return cls(held, *first[:4], entries)

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H] bf16 or float32 (moe_decode_batch_f32), weights [T, k], ids [T, k] -> [T, H] in x's dtype: row
        t = sum_j weights_tj * expert_{ids_tj}(x_t)."""
        x = x.contiguous()
        out = torch.empty_like(x)
        w = weights.float().contiguous()  # [T, k]
        i = ids.to(torch.int64).contiguous()  # [T, k]
        lib = bf16_lib()
        call = lib.moe_decode_batch_f32 if x.dtype == torch.float32 else lib.moe_decode_batch
        call(self.kind, x.data_ptr(), x.shape[0], self.hidden, self.inter, self.group,
                                    self.num_experts, i.shape[1], i.data_ptr(), w.data_ptr(), *self.tables,
                                    out.data_ptr())
        return out


def take_counts() -> dict[str, int] | None:
    """Native MoE calls, token-expert assignments and expert runs (weight streams) since the last call, or None
    without the native library. The one-token-at-a-time path ran one expert per assignment."""
    lib = bf16_lib()
    if lib is None:
        return None
    out = (ctypes.c_int64 * 3)()
    lib.moe_take_counts(out)
    return {"calls": out[0], "assignments": out[1], "expert_runs": out[2]}
