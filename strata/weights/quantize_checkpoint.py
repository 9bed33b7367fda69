"""Quantize an HF checkpoint folder into another, purely by tensor names (`strata quantize`).

Every 2-D `<module>.weight` of a linear projection (module names ending in one of QUANT_PROJECTIONS) becomes
`<module>.qweight/.scales[/.zeros]` in the module's format; every other tensor (embeddings, lm_head, norms,
routers such as `mlp.gate`, `shared_expert_gate`, biases) is copied unchanged. Shards keep their file
names, the index is rewritten, other files (tokenizer, generation config...) are copied, and config.json
gets `quantization_config`. Everything is written to a temporary sibling folder renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from strata.errors import UnsupportedError, WeightsError
from strata.quant.format import DEFAULT_METHOD, QuantFormat, check_method, quantize_weight
from strata.weights.quant_plan import Calibration, MixedPlanConfig, check_budget, plan_mixed, weight_error
from strata.weights.quant_tune import TuneConfig, tune_shards

QUANT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")
INDEX = "model.safetensors.index.json"


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    parts = name.split(".")
    return len(shape) == 2 and len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in QUANT_PROJECTIONS


def _shards(src: Path) -> list[str]:
    index = src / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WeightsError(f"{index}: expected a JSON object with a 'weight_map' field") from None
        names = sorted(set(weight_map.values()))
    else:
        names = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))
    if not names:
        raise WeightsError(f"{src}: no model.safetensors (or sharded *.safetensors) found")
    for n in names:
        if not (src / n).is_file():
            raise WeightsError(f"{src / n}: file not found (listed in {INDEX})")
    return names


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for truncated/corrupt files
        raise WeightsError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0]})") from None


def _get(handle, path: Path, name: str) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except Exception as e:  # noqa: BLE001 - same as _open
        raise WeightsError(f"{path}: tensor '{name}' cannot be read ({str(e).splitlines()[0]})") from None


def scan(src: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """{module: (out, in)} of the quantizable linears, and the bytes of all other tensors."""
    shapes, other = {}, 0
    for shard in _shards(src):
        with _open(src / shard) as h:
            for name in list(h.keys()):
                sl = h.get_slice(name)
                shape = tuple(sl.get_shape())
                if is_quantizable(name, shape):
                    shapes[name[: -len(".weight")]] = shape
                else:
                    other += torch.Size(shape).numel() * _dtype_bytes(sl.get_dtype())
    return shapes, other


def _dtype_bytes(st_dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
            "U16": 2}.get(st_dtype, 1)


def mixed_formats(src: Path, cfg: MixedPlanConfig, progress: bool = True) -> dict[str, str]:
    """Measure each linear's error under each candidate format, then plan within cfg.budget_bytes."""
    shapes, other = scan(src)
    cfg.fixed_bytes = cfg.fixed_bytes or other
    check_budget(shapes, cfg)  # before the slow part
    errors = {}
    bar = tqdm(total=len(shapes), desc="measuring", unit="linear", disable=not progress, file=sys.stderr)
    for shard in _shards(src):
        with _open(src / shard) as h:
            for name in list(h.keys()):
                module = name[: -len(".weight")]
                if module in shapes:
                    w = _get(h, src / shard, name)
                    for f in cfg.formats:
                        f = QuantFormat.parse(f)
                        errors[(module, str(f))] = weight_error(w, f, cfg.input_sq.get(module), cfg.method,
                                                                cfg.second_moment.get(module))
                    bar.update(1)
    bar.close()
    return plan_mixed(shapes, cfg, errors)


def quantize_checkpoint(src: str | Path, dst: str | Path, fmt: str | QuantFormat | None = None,
                        modules: dict[str, str] | None = None, force: bool = False, progress: bool = True,
                        label: str | None = None, method: str = DEFAULT_METHOD,
                        calibration: Calibration | None = None, lm_head: str | QuantFormat | None = None,
                        tune_ids: list[int] | None = None, tune_config: TuneConfig | None = None) -> Path:
    """Write the quantized copy of HF folder `src` to `dst`. Give `fmt` (all linears) or `modules`.

    lm_head: also quantize the output projection to this format (it is read every decode step: int8 halves
    its bytes). With tied embeddings the output gets its own quantized copy of the embedding matrix, the
    embedding lookup keeps the float rows, and the written config says tie_word_embeddings: false.

    method: how scales are chosen (strata.quant.format.METHODS). calibration: per-module input statistics; `clip`
    weights its error by E[x_j^2], `gptq` needs E[x x^T] (modules without it, e.g. an expert that no
    calibration token reached, fall back to clip). `tune` is gptq, then the int4 scales and codes of the whole
    model tuned end to end on the calibration token ids `tune_ids` (quant_tune.py; settings in tune_config).
    """
    src, dst = Path(src), Path(dst)
    check_method(method, "--method")
    if method in ("gptq", "tune") and (calibration is None or not calibration.second_moment):
        raise UnsupportedError(f"--method {method} needs calibration with second moments (--calibrate-data FILE)")
    if method == "tune" and not tune_ids:
        raise UnsupportedError("--method tune needs calibration text (--calibrate-data FILE), not only statistics")
    if not (src / "config.json").is_file():
        raise WeightsError(f"{src}: not an HF model folder (config.json missing)")
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise UnsupportedError(f"{src}/config.json: the checkpoint is already quantized")
    if dst.exists() and not force:
        raise WeightsError(f"{dst}: already exists (use --force to replace it)")
    if modules is None:
        fmt = QuantFormat.parse(fmt if fmt is not None else "int8")
        modules = {m: str(fmt) for m in scan(src)[0]}
    shards = _shards(src)
    copies = {}  # source tensor -> module: a tensor quantized a second time under another name
    if lm_head is not None:
        modules = {**modules, "lm_head": str(QuantFormat.parse(lm_head))}
        if config.get("tie_word_embeddings", False):
            copies = _untied_head(src, shards)
            config["tie_word_embeddings"] = False  # the output projection is its own (quantized) tensor now
    modules = {m: str(QuantFormat.parse(f)) for m, f in modules.items()}
    total = sum((src / s).stat().st_size for s in shards)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        weight_map = {}
        with tqdm(total=total, desc="quantizing", unit="B", unit_scale=True, disable=not progress,
                  file=sys.stderr) as bar:
            for shard in shards:
                out = _quantize_shard(src / shard, modules, bar.update, method, calibration or Calibration(),
                                      copies)
                save_file(out, str(tmp / shard), metadata={"format": "pt"})
                weight_map.update({k: shard for k in out})
        if method == "tune":
            tune_shards(src, tmp, shards, modules, tune_ids, tune_config or TuneConfig(progress=progress))
        missing = [m for m in modules if f"{m}.qweight" not in weight_map]
        if missing:
            raise WeightsError(f"{src}: module '{missing[0]}' to quantize has no '{missing[0]}.weight' tensor")
        if (src / INDEX).exists() or len(shards) > 1:
            size = sum((tmp / s).stat().st_size for s in shards)
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map},
                                                indent=2))
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in shards and f.name not in (INDEX, "config.json"):
                shutil.copy2(f, tmp / f.name)
        config["quantization_config"] = {"quant_method": "strata", "format": label or _label(modules),
                                         "modules": modules}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _label(modules: dict[str, str]) -> str:
    kinds = set(modules.values())
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _untied_head(src: Path, shards: list[str]) -> dict[str, str]:
    """For --lm-head on tied embeddings: {embedding tensor: "lm_head"}, so the output projection gets its own
    quantized copy while the embedding lookup keeps its float rows; {} when the checkpoint stores
    lm_head.weight anyway (it is quantized like any other module)."""
    names = set()
    for shard in shards:
        with _open(src / shard) as h:
            names.update(h.keys())
    if "lm_head.weight" in names:
        return {}
    embed = [n for n in sorted(names) if n.endswith("embed_tokens.weight")]
    if len(embed) != 1:
        raise WeightsError(f"{src}: --lm-head on tied embeddings needs one '*embed_tokens.weight' tensor to copy, "
                           f"found {embed or 'none'}")
    return {embed[0]: "lm_head"}


def _quantize_shard(path: Path, modules: dict[str, str], advance: Callable[[int], object], method: str,
                    calib: Calibration, copies: dict[str, str] | None = None) -> dict:
    """The shard's tensors with each module in `modules` quantized; copies: {tensor: module} also written
    quantized under the module's name (the tensor itself is kept as it is)."""
    out = {}
    with _open(path) as h:
        for name in list(h.keys()):
            t = _get(h, path, name)
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            targets = [module] if module in modules else []
            if copies and name in copies:
                out[name] = t.contiguous()
                targets = [copies[name]]
            elif not targets:
                out[name] = t.contiguous()
            for module in targets:
                if t.dim() != 2:
                    raise WeightsError(f"{path}: tensor '{name}' is {list(t.shape)}, expected a 2-D linear weight")
                hessian = calib.second_moment.get(module)
                m = method if method not in ("gptq", "tune") or hessian is not None else "clip"
                q_tensors = quantize_weight(t, modules[module], m, calib.input_sq.get(module),
                                            hessian if m in ("gptq", "tune") else None)
                for suffix, q in q_tensors.items():
                    out[f"{module}.{suffix}"] = q.contiguous()
            advance(t.numel() * t.element_size())
    return out


def _replace_dir(tmp: Path, dst: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
