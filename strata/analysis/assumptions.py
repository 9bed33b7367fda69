"""What a prediction assumes where its input is silent: the weight formats (stated, else the model file or name,
else the engine's default, else the model's native storage, else bf16) and the host behind an offloading GPU.
Each choice comes back with a sentence saying where it came from, for the printed assumptions.
"""

from __future__ import annotations

from strata.analysis.engines import EXPERT_OFFLOAD_FAMILIES, Engine, default_quant
from strata.analysis.hardware import System, load_catalog
from strata.analysis.models import ResolvedModel
from strata.analysis.operators import weight_bytes
from strata.analysis.precision import Precisions, canon, parse_published
from strata.analysis.shapes import ModelShape

GIB = 2**30
ASSUMED_HOST = "desktop-host-ddr4"  # the host an offloading engine's GPU row is given when it names none


def weight_formats(stated: str | None, engine: Engine, model: ResolvedModel) -> tuple[dict[str, str], str, bool]:
    """({'weights', 'experts', 'head'} formats, where they come from, whether they were assumed rather than stated).

    `stated` is free text ('Q4_K_M (GGUF)', 'MXFP4', '4-bit') or None."""
    fmt = parse_published(stated, engine.family) if stated else None
    dq = default_quant(engine)
    if stated and dq and fmt is None and "default" in stated.lower():  # 'Ollama default quant'
        return {"weights": dq[0]}, f"weights {dq[0]}: {stated!r} is {engine.name}'s default ({dq[1]})", False
    if fmt:
        native = model.key and _preset_quant(model.key)
        if native and any(fmt == v for v in native.get("native", {}).values()):
            # a model stored in mixed formats (gpt-oss: MXFP4 experts) is named by its distinctive one
            mix = native.get("gguf" if engine.family == "llama.cpp" and "gguf" in native else "native")
            return dict(mix), f"weights {_describe(mix)} ({stated!r} read as the model's own mix)", False
        return {"weights": fmt}, f"weights {fmt} (stated: {stated!r})", False
    if model.formats:
        return dict(model.formats), f"weights {_describe(model.formats)} (from {model.formats_source})", False
    if dq:
        return {"weights": dq[0]}, f"weights {dq[0]}: not stated, {engine.name}'s default ({dq[1]})", True
    return {"weights": "bf16"}, "weights bf16: not stated, assumed the model's 16-bit checkpoint", True


def _preset_quant(key: str) -> dict:
    from strata.analysis.shapes import load_presets

    return load_presets()[key].get("quant", {})


def _describe(fmts: dict[str, str]) -> str:
    rest = ", ".join(f"{k} {v}" for k, v in fmts.items() if k != "weights")
    return fmts["weights"] + (f" ({rest})" if rest else "")


def precisions(fmts: dict[str, str], kv: str = "fp16", activations: str = "fp16") -> Precisions:
    return Precisions(canon(fmts["weights"]), fmts.get("experts"), activations, kv, fmts.get("head"))


def offload_host(sys: System, engine: Engine, shape: ModelShape, prec: Precisions) -> str | None:
    """Give a lone GPU an assumed host where the engine needs one: an expert-offloading engine keeps its experts in
    host memory, and a model whose weights do not fit the GPUs runs its remaining layers (or experts) on the host
    CPU, as llama.cpp / Ollama split them. Returns the note, None when nothing was assumed."""
    if sys.host is not None or sys.device.cls != "gpu":
        return None
    if engine.family in EXPERT_OFFLOAD_FAMILIES and shape.is_moe:
        why = f"for {engine.name}'s offloaded experts"
    elif weight_bytes(shape, prec)["total"] > sys.device.memory_gb * GIB * sys.count:  # GPU memory sizes are GiB
        why = f"the weights do not fit {sys.count * sys.device.memory_gb:g} GB of GPU memory"
    else:
        return None
    sys.host = load_catalog()[ASSUMED_HOST]
    return f"host: none named; assumed {sys.host.name}: {why}"
