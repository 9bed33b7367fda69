"""Resident low-bit expert copies for `--miss-fallback lowbit`: built once at load, sized from headers.

Every routed expert gets a resident int4 copy (QuantLinear per linear) that stays in RAM; on a cache miss
the provider runs that copy while the expert itself is read in the background. By the expert's format:
    float           quantized to int4-g64;
    int8-nested-gG  the int4-gG code inside each byte (strata.quant.format.nested_int4_view): no requantization,
                    half the bytes (the D2MoE layout: hot experts in the cache at 8 bits, all at 4 bits);
    int8, fp8       dequantized once at load and requantized to int4-g64;
    int4-gG         the expert itself (it is already at low bits): its copy is exact and the same size.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from strata.errors import UnsupportedError
from strata.layers.quant_linear import QuantLinear
from strata.quant.format import QuantFormat, dequantize_weight, nested_int4_view, quantize_weight
from strata.tiers.store import ExpertStore, alloc_aligned

LOWBIT_FORMAT = QuantFormat.parse("int4-g64")
_FLOAT_CODES = {"F64", "F32", "F16", "BF16"}


def lowbit_nbytes(name: str, dtype: str, shape: tuple[int, ...], nbytes: int,
                  fmt: QuantFormat | None = None) -> int:
    """Bytes the low-bit copy keeps for one stored expert tensor (dtype as a safetensors code; fmt: the format
    of the tensor's linear from quantization_config, None when unquantized)."""
    suffix = name.rpartition(".")[2]
    if fmt is None:
        if suffix == "weight" and len(shape) == 2 and dtype in _FLOAT_CODES:
            return LOWBIT_FORMAT.nbytes(shape[0], shape[1])
        return nbytes
    if fmt.kind == "int8-nested" and suffix == "qweight":
        return nbytes // 2  # [out, Kp] -> two int4 codes per byte
    if fmt.kind in ("int8", "fp8") and suffix in ("qweight", "scales"):
        return LOWBIT_FORMAT.nbytes(shape[0], shape[1]) if suffix == "qweight" else 0
    return nbytes  # int4 tensors, nested scales (same shape in the int4 view), biases


def _lowbit_linear(name: str, lin: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> QuantLinear:
    if isinstance(lin, QuantLinear):
        stored = {s: tensors[f"{name}.{s}"] for s in lin.fmt.tensor_specs(1, 1)}
        if lin.fmt.kind == "int8-nested":
            q, fmt = nested_int4_view(stored, lin.fmt)
        elif lin.fmt.kind == "int4":
            q, fmt = {s: t.clone() for s, t in stored.items()}, lin.fmt
        else:
            w = dequantize_weight(stored, lin.fmt, lin.out_features, lin.in_features)  # [out, in] fp32, transient
            q, fmt = quantize_weight(w, LOWBIT_FORMAT), LOWBIT_FORMAT
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
    protos = {b.layer_idx: b.experts for b in blocks}  # per expert: a --mixed plan gives each its own formats
    it = keys
    if progress:
        from tqdm import tqdm

        it = tqdm(keys, desc="low-bit experts", unit="expert", leave=False)
    out: dict[int, list[nn.Module]] = {b.layer_idx: [] for b in blocks}
    try:
        for key in it:
            store.read_into(key, view)
            out[key[0]].append(lowbit_expert(protos[key[0]][key[1]], store.views(key, buf), dtype))
    finally:
        view.release()
        del buf
        try:
            mm.close()
        except BufferError:  # a tensor view is still referenced; the mapping goes with it
            pass
    return out
