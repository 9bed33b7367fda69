"""Builds a model on the meta device and fills it from memory-mapped safetensors (no double memory)."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable

import torch
from safetensors import safe_open
from tqdm import tqdm

from strata.config import ModelConfig
from strata.errors import WeightsError
from strata.layers.fusion import fuse_model, release_pages
from strata.mapping import file_ranges, read_in
from strata.models.base import CausalLM
from strata.models.registry import load_config, model_class
from strata.quant.format import read_quantization_config
from strata.weights.checks import check_dtype, check_finite_values, check_layer_count

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_QUANT_SUFFIXES = (".qweight", ".scales", ".zeros")


def quantized(name: str) -> bool:
    return name.endswith(_QUANT_SUFFIXES)


def resolve_dtype(dtype: str | torch.dtype | None, cfg: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or cfg.torch_dtype
    if name == "auto":
        name = cfg.torch_dtype
    if name not in DTYPES:
        raise WeightsError(f"dtype must be one of {', '.join(DTYPES)} or auto, got {name!r}")
    return DTYPES[name]


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's safetensors files: single file, an index's shards, or every *.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WeightsError(f"{index}: expected a JSON object with a 'weight_map' field") from None
        files = [os.path.join(path, n) for n in sorted(set(weight_map.values()))]
    else:
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise WeightsError(f"{path}: no model.safetensors (or sharded *.safetensors) found")
    for fn in files:
        if not os.path.exists(fn):
            raise WeightsError(f"{fn}: file not found (listed in model.safetensors.index.json)")
    return files


def iter_checkpoint(files: list[str]):
    """Yields (file, name, lazy getter) for each tensor; errors name the file."""
    for fn in files:
        try:
            handle = safe_open(fn, framework="pt")
            keys = list(handle.keys())
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for corrupt headers
            raise WeightsError(f"{fn}: not a valid safetensors file ({str(e).splitlines()[0]})") from None
        for k in keys:
            yield fn, k, (lambda h=handle, k=k: h.get_tensor(k))


_STACKED_EXPERTS = re.compile(r"^(.*\.experts)\.([^.]+)$")


def unstack_experts(entries, expected: dict):
    """Splits a stacked expert tensor `...experts.NAME [E, ...]` (gpt-oss) into the per-expert entries
    `...experts.e.NAME` the model's expert modules hold; each is a view of the stacked tensor."""
    for fn, name, get in entries:
        m = _STACKED_EXPERTS.match(name)
        if name in expected or m is None or f"{m[1]}.0.{m[2]}" not in expected:
            yield fn, name, get
            continue
        count = 0
        while f"{m[1]}.{count}.{m[2]}" in expected:
            count += 1
        whole = functools.cache(get)  # read once for all its experts
        for e in range(count):
            yield fn, f"{m[1]}.{e}.{m[2]}", (lambda fn=fn, name=name, whole=whole, e=e, n=count: _expert_slice(
                fn, name, whole(), e, n))


def _expert_slice(fn: str, name: str, t: torch.Tensor, e: int, count: int) -> torch.Tensor:
    if t.dim() == 0 or t.shape[0] != count:
        raise WeightsError(f"{fn}: tensor '{name}' has shape {list(t.shape)}, expected {count} experts "
                           "stacked in its first dimension (config.json)")
    return t[e]


def load_model(
    path: str,
    dtype: str | torch.dtype | None = None,
    skip: Callable[[str], bool] | None = None,
    progress: bool = True,
    fuse: bool = True,
    check_finite: bool = True,
    shard=None,
) -> CausalLM:
    """Load an HF folder. `skip(name)` leaves a tensor on the meta device (e.g. experts served from disk);
    `check_finite` refuses a floating-point tensor holding NaN or inf (one reduction per tensor); `shard` (a
    strata.distributed.tensor_parallel.Shard) builds one tensor-parallel rank's slice of the model."""
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: model folder not found")
    cfg = load_config(path)
    if shard is not None:
        cfg = shard.config(cfg, path)
        skip = shard.skipper(skip)  # expert parallel: the experts other ranks hold
    cls = model_class(cfg)
    torch_dtype = resolve_dtype(dtype, cfg)
    with torch.device("meta"):
        model = cls(cfg)
    # one line for a method or format Strata does not run; a family may read its own (gpt-oss: mxfp4)
    formats = read_quantization_config(cfg.raw, cls.own_quant_methods)
    if formats:
        from strata.layers.quant_embedding import swap_embedding
        from strata.layers.quant_linear import swap_linears

        if "model.embed_tokens" in formats:  # a table kept quantized: lookups dequantize their rows
            formats = dict(formats)
            swap_embedding(model, formats.pop("model.embed_tokens"), torch_dtype)
        swap_linears(model, formats)
    expected = {k: v for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    files = safetensors_files(path)
    state: dict[str, torch.Tensor] = {}
    entries = list(unstack_experts(iter_checkpoint(files), expected))
    mapped = file_ranges()  # the checkpoint's mappings (safe_open maps each file)
    bar = tqdm(entries, desc="loading", unit="tensor", disable=not progress, file=sys.stderr, leave=False)
    for fn, stored, get in bar:
        name = cls.sanitize(stored)  # the family's renames; None: a tensor it drops
        if name is None:
            continue
        if name not in expected:
            check_layer_count(fn, name, cfg)
            if not (cfg.tie_word_embeddings and name == "lm_head.weight"):
                print(f"warning: {fn}: unexpected tensor '{stored}' ignored", file=sys.stderr)
            continue
        if skip is not None and skip(name):
            continue
        try:
            t = get()
        except Exception as e:  # noqa: BLE001 - same as iter_checkpoint
            raise WeightsError(f"{fn}: tensor '{stored}' cannot be read ({str(e).splitlines()[0]})") from None
        if shard is not None:
            t = shard.tensor(name, t)
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape):
            raise WeightsError(
                f"{fn}: tensor '{name}' has shape {list(t.shape)}, expected {list(want.shape)} from config.json"
            )
        check_dtype(fn, name, t, want)
        # quantized tensors keep their stored dtype (fp16 group scales would lose bits as bf16)
        if t.is_floating_point() and want.is_floating_point() and t.dtype != torch_dtype and not quantized(name):
            stored = t
            t = t.float() if name.endswith(cls.keep_float32) else t.to(torch_dtype)
            # the stored copy's file pages would stay in RSS while other tensors keep the mapping (a GGUF's float32
            # embedding beside its bfloat16 copy, outside what --memory-budget plans)
            release_pages(stored, mapped)
        if check_finite:
            check_finite_values(fn, name, t)
        # otherwise the tensor stays a view of the file mapping (page cache): copying it would count the same
        # bytes twice in RSS while the mapping lives, which broke the tiers' memory budget (measured: 1.54 GiB
        # peak for a 1.34 GiB budget, and 19 GB for a 6.6 GB resident model)
        state[name] = t
    missing = [k for k in expected if k not in state and not (skip is not None and skip(k))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(
            f"{path}: tensor '{missing[0]}' missing from the checkpoint{more}, "
            f"expected shape {list(expected[missing[0]].shape)}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    for m in model.modules():
        # a module whose tensors `skip` left on meta (an expert served by the tiers) is prepared there, per slot
        offloaded = skip is not None and any(t.is_meta for t in m.buffers(recurse=False))
        if hasattr(m, "post_load") and m is not model and not offloaded:
            m.post_load()
    model.post_load()
    model.eval().requires_grad_(False)
    if fuse:
        fuse_model(model)
    read_in([*model.parameters(), *model.buffers()], progress)  # mapped weights: off the disk now
    return model
