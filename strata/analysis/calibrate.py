"""Fit efficiency factors (eta_bw, eta_flops, overhead_us) per hardware class and per (class, engine) on a
measurements CSV, and measure honestly how well they generalise (leave-one-out and leave-one-source-out).

Loss: sum over rows of |log(pred/measured)| plus a pull of each factor towards its parent (engine -> class
-> physical prior), so groups with few rows stay near physics. Coordinate descent over a bounded grid.
Run: `python -m strata.analysis.calibrate [CSV]` (writes calibration.json next to this file).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from collections import Counter
from dataclasses import replace

import numpy as np

from strata.analysis.efficiency import (
    BOUNDS,
    CALIBRATION_PATH,
    DEFAULT,
    NEUTRAL,
    PRIORS,
    RATIO_PRIORS,
    Eff,
    Efficiencies,
)
from strata.analysis.validate import Case, load_cases, score
from strata.fileio import write_json_atomic

MIN_ENGINE_ROWS = 2  # an engine gets its own ratio (shared by all classes) with at least this many rows
MIN_CELL_ROWS = 2  # a (class, engine) cell gets its own factors only with at least this many rows
PULL = 0.5  # weight of |log(param / parent)| per parameter
PARAMS = ("eta_flops", "eta_q", "eta_bw", "overhead_us", "seq_us")  # fitted one at a time, in this order
GRIDS = {
    "eta_bw": np.geomspace(BOUNDS["eta_bw"][0], 1.0, 48),
    "eta_flops": np.geomspace(BOUNDS["eta_flops"][0], 1.0, 48),
    "overhead_us": np.concatenate([[0.0], np.geomspace(0.1, BOUNDS["overhead_us"][1], 40)]),
    "eta_q": np.geomspace(BOUNDS["eta_q"][0], 1.0, 24),
    "seq_us": np.concatenate([[0.0], np.geomspace(0.5, BOUNDS["seq_us"][1], 36)]),
}
RATIO_GRIDS = {  # engine ratios multiply the class factor
    "eta_bw": np.geomspace(0.2, 2.0, 40),
    "eta_flops": np.geomspace(0.05, 4.0, 48),
    "overhead_us": np.concatenate([[0.0], np.geomspace(0.05, 20.0, 40)]),
    "eta_q": np.geomspace(0.4, 2.0, 24),
    "seq_us": np.concatenate([[0.0], np.geomspace(0.05, 20.0, 36)]),
}


def _parent(key: str, table: dict[str, Eff]) -> Eff:
    """Class -> physical prior; '*|engine' ratio -> its measured prior or neutral; cell -> class x engine ratio."""
    if key.startswith("*|"):
        return RATIO_PRIORS.get(key, NEUTRAL)
    if "|" in key:
        cls, engine = key.split("|", 1)
        base = table.get(cls) or PRIORS.get(cls, DEFAULT)
        ratio = table.get(f"*|{engine}")
        return base.times(ratio) if ratio else base
    return PRIORS.get(key, DEFAULT)


def _pull(e: Eff, par: Eff) -> float:
    return PULL * (abs(math.log(e.eta_bw / par.eta_bw)) + abs(math.log(e.eta_flops / par.eta_flops))
                   + abs(math.log((e.overhead_us + 0.5) / (par.overhead_us + 0.5)))
                   + abs(math.log(e.eta_q / par.eta_q))
                   + abs(math.log((e.seq_us + 0.5) / (par.seq_us + 0.5))))


def _loss(cases: list[Case], effs: Efficiencies, keys: list[str]) -> float:
    total = 0.0
    for c in cases:
        p = c.predict(effs)
        total += abs(math.log(max(p, 1e-12) / c.measured))
    for k in keys:
        total += _pull(effs.table[k], _parent(k, effs.table))
    return total


def _touching(cases: list[Case], key: str) -> list[Case]:
    if key.startswith("*|"):
        return [c for c in cases if any(g.split("|", 1)[1] == key[2:] for g in c.groups)]
    if "|" in key:
        return [c for c in cases if key in c.groups]
    return [c for c in cases if any(g.split("|")[0] == key for g in c.groups)]


def fit(cases: list[Case], start: Efficiencies | None = None, only: set[str] | None = None,
        sweeps: int = 3) -> Efficiencies:
    usable = [c for c in cases if not c.reason]
    counts = Counter(g for c in usable for g in c.groups)
    by_engine = Counter(g.split("|", 1)[1] for c in usable for g in c.groups)
    classes = sorted({g.split("|")[0] for g in counts})
    ratios = sorted(f"*|{e}" for e, n in by_engine.items() if n >= MIN_ENGINE_ROWS)
    cells = sorted(g for g, n in counts.items() if n >= MIN_CELL_ROWS)
    effs = Efficiencies(dict(start.table) if start else {})
    for k in classes:
        effs.table.setdefault(k, PRIORS.get(k, DEFAULT))
    for k in ratios:
        effs.table.setdefault(k, RATIO_PRIORS.get(k, NEUTRAL))
    for k in cells:
        effs.table.setdefault(k, _parent(k, effs.table))
    keys = [k for k in classes + ratios + cells if only is None or k in only]
    for _ in range(sweeps):
        for k in keys:
            rows = _touching(usable, k)
            if rows:
                _fit_group(rows, effs, k)
    return effs


def _search(rows: list[Case], effs: Efficiencies, k: str, axes: dict[str, np.ndarray]) -> None:
    """Sets k's parameters named in `axes` to the grid point (all combinations) of lowest loss."""
    best, arg = None, None
    for point in itertools.product(*(map(float, v) for v in axes.values())):
        effs.table[k] = replace(effs.table[k], **dict(zip(axes, point)))
        loss = _loss(rows, effs, [k])
        if best is None or loss < best:
            best, arg = loss, point
    effs.table[k] = replace(effs.table[k], **dict(zip(axes, arg)))


def _fit_group(rows: list[Case], effs: Efficiencies, k: str) -> None:
    """Joint grids over the pairs that trade off: (eta_bw, overhead_us) in decode, (eta_flops, seq_us) in
    big-batch steps; then each parameter alone."""
    grids = RATIO_GRIDS if k.startswith("*|") else GRIDS
    _search(rows, effs, k, {"eta_bw": grids["eta_bw"][::2], "overhead_us": grids["overhead_us"][::2]})
    if any(c.batch > 1 for c in rows):
        _search(rows, effs, k, {"eta_flops": grids["eta_flops"][::2], "seq_us": grids["seq_us"][::2]})
    for param in PARAMS:
        _search(rows, effs, k, {param: grids[param]})


def held_out_predictions(cases: list[Case], full: Efficiencies, by_source: bool = False) -> dict[int, float]:
    """Prediction of each row by factors fitted without it (or without its whole source)."""
    out: dict[int, float] = {}
    usable = [c for c in cases if not c.reason]
    folds: dict[str, list[Case]] = {}
    for c in usable:
        folds.setdefault(c.row["source"] if by_source else str(c.index), []).append(c)
    for fold in folds.values():
        ids = {c.index for c in fold}
        train = [c for c in usable if c.index not in ids]
        touched = set().union(*(c.groups for c in fold))
        touched |= {g.split("|")[0] for g in touched} | {"*|" + g.split("|", 1)[1] for g in touched}
        # refit from scratch those groups the fold touches; a group with no rows left falls back to its parent
        start = Efficiencies({k: v for k, v in full.table.items() if k not in touched})
        effs = fit(train, start=start, only=touched, sweeps=3)
        for c in fold:
            out[c.index] = c.predict(effs)
    return out


def main(argv: list[str]) -> int:
    default_csv = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "published-perf",
                               "measurements.csv")
    path = argv[0] if argv else default_csv
    cases = load_cases(path)
    effs = fit(cases)
    fitted = score(cases, effs)
    loo = score(cases, effs, held_out_predictions(cases, effs))
    loso = score(cases, effs, held_out_predictions(cases, effs, by_source=True))
    summary = {name: {k: r[k] for k in ("median_ape", "p90_ape", "gmean_ratio", "n_predicted", "n_unpredictable")}
               for name, r in (("fitted", fitted), ("leave_one_out", loo), ("leave_one_source_out", loso))}
    doc = {"_comment": "written by `python -m strata.analysis.calibrate`; factors per hardware class and "
                       "class|engine; see docs/analysis.md", "csv": os.path.basename(path),
           "factors": effs.to_json(), "validation": summary}
    write_json_atomic(CALIBRATION_PATH, doc, indent=1)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
