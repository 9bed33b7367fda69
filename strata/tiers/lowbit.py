"""Resident low-bit expert copies for `--miss-fallback lowbit`: built once at load, sized from headers.

Every routed expert gets an int4-g64 copy (QuantLinear per linear) that stays in RAM; on a cache miss
the provider runs that copy while the full-precision expert is read in the background. A store of
int8-nested experts needs no requantization: the copy is the int4 code inside each byte
(quant_format.nested_int4_view). Other quantized expert formats are refused.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from strata.errors import UnsupportedError
from strata.layers.quant_linear import QuantLinear
from strata.tiers.store import ExpertStore, alloc_aligned
from strata.weights.quant_format import QuantFormat, nested_int4_view, quantize_weight

LOWBIT_FORMAT = QuantFormat.parse("int4-g64")
_FLOAT_CODES = {"F64", "F32", "F16", "BF16"}


def lowbit_nbytes(name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> int:
    """Bytes the low-bit copy keeps for one stored expert tensor (dtype as a safetensors code)."""
    if name.endswith(".weight") and len(shape) == 2 and dtype in _FLOAT_CODES:
        return LOWBIT_FORMAT.nbytes(shape[0], shape[1])
    if name.endswith(".qweight") and dtype == "U8":
        return nbytes // 2  # int8-nested [out, Kp] -> two int4 codes per byte
    return nbytes  # scales (same shape in the int4 view), biases


def _lowbit_linear(name: str, lin: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> QuantLinear:
    if isinstance(lin, QuantLinear):
        if lin.fmt.kind != "int8-nested":
            raise UnsupportedError(f"expert linear {name}: --miss-fallback lowbit needs float or int8-nested "
                                   f"experts, found format {lin.fmt}")
        q, fmt = nested_int4_view({s: tensors[f"{name}.{s}"] for s in ("qweight", "scales")}, lin.fmt)
    else:
        weight = tensors.get(f"{name}.weight")
        if weight is None:
            raise UnsupportedError(f"expert tensor {name}.weight: not in the store (found {sorted(tensors)}); "
                                   "--miss-fallback lowbit needs one weight per expert linear")
        q, fmt = quantize_weight(weight.float(), LOWBIT_FORMAT), LOWBIT_FORMAT
    bias = tensors.get(f"{name}.bias")
    out = QuantLinear(lin.in_features, lin.out_features, fmt, bias=bias is not None, dtype=dtype)
    for suffix, t in q.items():
        setattr(out, suffix, t)
    if bias is not None:
        out.bias = bias.to(dtype).clone()
    out.module_name = name
    out.post_load()
    return out


def lowbit_expert(proto: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """A copy of the expert module `proto` (may live on meta) whose linears are int4 QuantLinears built
    from the expert's stored tensors; other parameters are copied at `dtype`."""
    module = copy.deepcopy(proto)
    linears = [(n, m) for n, m in module.named_modules() if n and isinstance(m, (nn.Linear, QuantLinear))]
    for name, lin in linears:
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr,
                _lowbit_linear(name, lin, tensors, dtype))
    rest = {k: tensors[k].to(dtype).clone() for k, v in module.state_dict(keep_vars=True).items() if v.is_meta}
    if rest:
        module.load_state_dict(rest, strict=False, assign=True)
    return module


def build_lowbit_experts(store: ExpertStore, blocks, dtype: torch.dtype, progress: bool = False
                         ) -> dict[int, list[nn.Module]]:
    """layer -> one low-bit module per expert, each read once from the store through one aligned buffer."""
    mm, buf = alloc_aligned(store.slot_bytes)  # [slot_bytes]
    view = memoryview(mm)
    keys = [(b.layer_idx, e) for b in blocks for e in range(b.num_experts)]
    protos = {b.layer_idx: b.experts[0] for b in blocks}  # every expert of a block shares one architecture
    it = keys
    if progress:
        from tqdm import tqdm

        it = tqdm(keys, desc="low-bit experts", unit="expert", leave=False)
    out: dict[int, list[nn.Module]] = {b.layer_idx: [] for b in blocks}
    try:
        for key in it:
            store.read_into(key, view)
            out[key[0]].append(lowbit_expert(protos[key[0]], store.views(key, buf), dtype))
    finally:
        view.release()
        del buf
        try:
            mm.close()
        except BufferError:  # a tensor view is still referenced; the mapping goes with it
            pass
    return out
