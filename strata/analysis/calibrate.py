"""Fit efficiency factors (eta_bw, eta_flops, overhead_us) per hardware class and per (class, engine) on a
measurements CSV, and measure honestly how well they generalise (leave-one-out and leave-one-source-out).

Loss: sum over rows of |log(pred/measured)| plus a pull of each factor towards its parent (engine -> class
-> physical prior), so groups with few rows stay near physics. Coordinate descent over a bounded grid.
Run: `python -m strata.analysis.calibrate [CSV]` (writes calibration.json next to this file).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from dataclasses import replace

import numpy as np

from strata.analysis.efficiency import BOUNDS, CALIBRATION_PATH, DEFAULT, PRIORS, Eff, Efficiencies
from strata.analysis.validate import Case, load_cases, score

MIN_ENGINE_ROWS = 2  # an engine gets its own factors only with at least this many rows on a class
PULL = 0.5  # weight of |log(param / parent)| per parameter
GRIDS = {
    "eta_bw": np.geomspace(BOUNDS["eta_bw"][0], 1.0, 48),
    "eta_flops": np.geomspace(BOUNDS["eta_flops"][0], 1.0, 48),
    "overhead_us": np.concatenate([[0.0], np.geomspace(1.0, BOUNDS["overhead_us"][1], 40)]),
}


def _parent(key: str, table: dict[str, Eff]) -> Eff:
    cls = key.split("|")[0]
    if "|" in key and cls in table:
        return table[cls]
    return PRIORS.get(cls, DEFAULT)


def _loss(cases: list[Case], effs: Efficiencies, keys: list[str]) -> float:
    total = 0.0
    for c in cases:
        p = c.predict(effs)
        total += abs(math.log(max(p, 1e-12) / c.measured))
    for k in keys:
        e, par = effs.table[k], _parent(k, effs.table)
        total += PULL * (abs(math.log(e.eta_bw / par.eta_bw)) + abs(math.log(e.eta_flops / par.eta_flops))
                         + abs(math.log((e.overhead_us + 5) / (par.overhead_us + 5))))
    return total


def _touching(cases: list[Case], key: str) -> list[Case]:
    if "|" in key:
        return [c for c in cases if key in c.groups]
    return [c for c in cases if any(g.split("|")[0] == key for g in c.groups)]


def fit(cases: list[Case], start: Efficiencies | None = None, only: set[str] | None = None,
        sweeps: int = 3) -> Efficiencies:
    usable = [c for c in cases if not c.reason]
    counts = Counter(g for c in usable for g in c.groups)
    classes = sorted({g.split("|")[0] for g in counts})
    engines = sorted(g for g, n in counts.items() if n >= MIN_ENGINE_ROWS)
    effs = Efficiencies(dict(start.table) if start else {})
    for k in classes:
        effs.table.setdefault(k, PRIORS.get(k, DEFAULT))
    for k in engines:
        effs.table.setdefault(k, effs.table[k.split("|")[0]])
    keys = [k for k in classes + engines if only is None or k in only]
    for _ in range(sweeps):
        for k in keys:
            rows = _touching(usable, k)
            if rows:
                _fit_group(rows, effs, k)
    return effs


def _fit_group(rows: list[Case], effs: Efficiencies, k: str) -> None:
    """Joint grid over (eta_bw, overhead_us), which trade off in decode, then eta_flops alone."""
    best, arg = None, None
    for bw in GRIDS["eta_bw"][::2]:
        for ov in GRIDS["overhead_us"][::2]:
            effs.table[k] = replace(effs.table[k], eta_bw=float(bw), overhead_us=float(ov))
            loss = _loss(rows, effs, [k])
            if best is None or loss < best:
                best, arg = loss, (float(bw), float(ov))
    effs.table[k] = replace(effs.table[k], eta_bw=arg[0], overhead_us=arg[1])
    for param in ("eta_flops", "eta_bw", "overhead_us"):
        best, best_v = None, None
        for v in GRIDS[param]:
            effs.table[k] = replace(effs.table[k], **{param: float(v)})
            loss = _loss(rows, effs, [k])
            if best is None or loss < best:
                best, best_v = loss, float(v)
        effs.table[k] = replace(effs.table[k], **{param: best_v})


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
        touched |= {g.split("|")[0] for g in touched}
        # refit from scratch those groups the fold touches; a group with no rows left falls back to its parent
        start = Efficiencies({k: v for k, v in full.table.items() if k not in touched})
        effs = fit(train, start=start, only=touched, sweeps=2)
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
    tmp = str(CALIBRATION_PATH) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, CALIBRATION_PATH)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
