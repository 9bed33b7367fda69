"""Per-module bit widths under a byte budget (`strata quantize --mixed --budget 2GiB`; EdgeMoE, D2MoE).

Units are whole experts (every linear under `...experts.<e>.` shares one format, so a tier can move an
expert as one piece) and each non-expert linear on its own. For each unit and candidate format we know the
bytes and an expected output error, and minimise the total

    sum over units of  routing frequency (share of tokens that use the unit; 1 for non-expert linears)
                     x output error (E ||(W - Q(W)) x||^2 over the unit's calibration inputs x)

The output error uses the diagonal of the input second moment: sum_ij (W - Q(W))_ij^2 * E[x_j^2]. Without
calibration statistics E[x_j^2] = 1 (plain weight error) and the frequency is uniform (top_k / num_experts).
The engine measures both on calibration text and hands them over in a calibration file (load_calibration):
`<module>.input_sq_mean` [in_features] and `<unit>.routing_frequency` [] tensors; see docs/quantization.md.
An explicit {unit: weight} mapping (`importance`) overrides the frequency of the units it names.

The solver is the classic greedy for multiple-choice knapsack: start every unit at its smallest format and
repeatedly take the upgrade with the best error reduction per extra byte until the budget is spent.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from strata import units
from strata.errors import UnsupportedError, WeightsError
from strata.quant.format import DEFAULT_METHOD, QuantFormat, dequantize_weight, quantize_weight

_EXPERT = re.compile(r"^(.*\.experts\.\d+)\.")
SAMPLE_ROWS = 64  # rows per linear used to measure quantization error (a proxy; cheap on big models)


def parse_size(text: str | int) -> int:
    try:
        return units.parse_size(text)
    except ValueError as e:
        raise UnsupportedError(f"--budget: {e}") from None


def unit_of(module: str) -> str:
    """The planning unit of a module: its expert prefix, or the module itself."""
    m = _EXPERT.match(module)
    return m.group(1) if m else module


@dataclass
class MixedPlanConfig:
    budget_bytes: int
    formats: tuple[str, ...] = ("int8", "int4-g64", "int4-g128")  # candidates; any order
    fixed_bytes: int = 0  # everything that is not a planned linear (embeddings, norms, lm_head, routers)
    expert_frequency: float = 1.0  # default routing frequency of an expert (top_k / num_experts)
    importance: dict[str, float] = field(default_factory=dict)  # per unit: routing frequency or a weight
    input_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # per module: E[x_j^2], calibration
    second_moment: dict[str, torch.Tensor] = field(default_factory=dict)  # per module: E[x x^T], for gptq
    method: str = DEFAULT_METHOD  # how each candidate is quantized when its error is measured


@dataclass
class Calibration:
    """Calibration statistics by module (and routing frequency by expert unit); see load_calibration."""

    input_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # E[x_j^2] [in]
    second_moment: dict[str, torch.Tensor] = field(default_factory=dict)  # E[x x^T] [in, in]
    routing_frequency: dict[str, float] = field(default_factory=dict)


def weight_error(w: torch.Tensor, fmt: QuantFormat, input_sq: torch.Tensor | None = None,
                 method: str = DEFAULT_METHOD, hessian: torch.Tensor | None = None) -> float:
    """Expected squared output error of quantizing w (measured on a row sample, scaled to all rows).

    input_sq [in_features]: mean of x_j^2 over calibration inputs; None means 1 (plain weight error).
    hessian [in, in]: E[x x^T]; when given the error is the full sum_rows d H d^T (what gptq minimises).
    """
    rows = w[: min(SAMPLE_ROWS, w.shape[0])].float()
    m = "clip" if method in ("gptq", "tune") and hessian is None else method
    q = quantize_weight(rows, fmt, m, input_sq, hessian if m in ("gptq", "tune") else None)
    d = dequantize_weight(q, fmt, rows.shape[0], rows.shape[1]) - rows  # [rows, in]
    if hessian is not None:
        err = (d @ hessian.float()) * d
    elif input_sq is not None:
        err = d * d * input_sq.float()[None, :]
    else:
        err = d * d
    return float(err.sum()) * w.shape[0] / rows.shape[0]


def load_calibration(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Calibration file -> ({module: input_sq_mean [in]}, {unit: routing_frequency})."""
    return split_calibration(_load(path), path)


def read_calibration(path: str | Path) -> Calibration:
    """Calibration file -> Calibration, second moments included."""
    return calibration_of(_load(path), path)


def _load(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise WeightsError(f"{path}: not a valid calibration safetensors file ({str(e).splitlines()[0]})") from None
    return tensors


def split_calibration(tensors: dict[str, torch.Tensor], source: str | Path = "calibration"
                      ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """{name: tensor} as in a calibration file -> ({module: input_sq_mean [in]}, {unit: routing_frequency})."""
    c = calibration_of(tensors, source)
    return c.input_sq, c.routing_frequency


def calibration_of(tensors: dict[str, torch.Tensor], source: str | Path = "calibration") -> Calibration:
    """{name: tensor} as in a calibration file -> Calibration."""
    c = Calibration()
    for name, t in tensors.items():
        if name.endswith(".input_sq_mean"):
            c.input_sq[name[: -len(".input_sq_mean")]] = t
        elif name.endswith(".input_second_moment"):
            c.second_moment[name[: -len(".input_second_moment")]] = t
        elif name.endswith(".routing_frequency"):
            c.routing_frequency[name[: -len(".routing_frequency")]] = float(t)
        else:
            raise WeightsError(f"{source}: tensor '{name}' is neither <module>.input_sq_mean, "
                               "<module>.input_second_moment nor <unit>.routing_frequency")
    return c


def _by_size(cfg: MixedPlanConfig, shapes: dict[str, tuple[int, int]]) -> list[QuantFormat]:
    """Candidates, largest first, by their bytes on these shapes (padding can make int4-g128 bigger than
    int4-g64 on narrow layers, e.g. stories260K's 64-wide projections)."""
    fmts = {QuantFormat.parse(f) for f in cfg.formats}
    return sorted(fmts, key=lambda f: (-sum(f.nbytes(*s) for s in shapes.values()), -f.nbytes(256, 4096)))


def check_budget(shapes: dict[str, tuple[int, int]], cfg: MixedPlanConfig) -> int:
    """Bytes with every planned linear at the smallest format; raises if that exceeds the budget."""
    smallest = _by_size(cfg, shapes)[-1]
    need = cfg.fixed_bytes + sum(smallest.nbytes(*s) for s in shapes.values())
    if need > cfg.budget_bytes:
        raise UnsupportedError(
            f"--budget {cfg.budget_bytes} bytes is too small: the model needs at least {need} bytes "
            f"with every planned linear at {smallest}"
        )
    return need


def plan_mixed(shapes: dict[str, tuple[int, int]], cfg: MixedPlanConfig,
               errors: dict[tuple[str, str], float]) -> dict[str, str]:
    """{module: (out, in)} and {(module, format): error} -> {module: format} within cfg.budget_bytes."""
    fmts = _by_size(cfg, shapes)
    units: dict[str, list[str]] = {}
    for name in shapes:
        units.setdefault(unit_of(name), []).append(name)
    size = {(u, f): sum(f.nbytes(*shapes[m]) for m in ms) for u, ms in units.items() for f in fmts}
    weight = {u: cfg.importance.get(u, cfg.expert_frequency if u.split(".")[-2:-1] == ["experts"] else 1.0)
              for u in units}
    cost = {(u, f): weight[u] * sum(errors[(m, str(f))] for m in ms) for u, ms in units.items() for f in fmts}
    level = {u: len(fmts) - 1 for u in units}  # index into fmts; last = smallest
    used = check_budget(shapes, cfg)

    def best_upgrade(u: str) -> tuple[float, int, int] | None:  # (ratio, target level, extra bytes)
        lv, best = level[u], None
        for up in range(lv):  # any larger format, so non-convex error curves still work
            extra = size[(u, fmts[up])] - size[(u, fmts[lv])]
            gain = cost[(u, fmts[lv])] - cost[(u, fmts[up])]
            if 0 < extra <= cfg.budget_bytes - used and gain > 0 and (best is None or gain / extra > best[0]):
                best = (gain / extra, up, extra)
        return best

    heap = []
    for u in units:
        if (b := best_upgrade(u)) is not None:
            heapq.heappush(heap, (-b[0], u, level[u], b[1], b[2]))
    while heap:
        _, u, frm, up, extra = heapq.heappop(heap)
        if level[u] != frm:
            continue  # stale entry
        if used + extra <= cfg.budget_bytes:
            level[u], used = up, used + extra
        if (b := best_upgrade(u)) is not None:  # next step, or a smaller one that still fits
            heapq.heappush(heap, (-b[0], u, level[u], b[1], b[2]))
    return {m: str(fmts[level[u]]) for u, ms in units.items() for m in ms}
