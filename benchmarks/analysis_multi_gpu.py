"""`strata analyze` on the published multi-GPU measurements: tensor parallel (TP), expert parallel beside data
parallel (DP + EP) and layer split (pipeline) rows of a measurements CSV, predicted with the shipped calibration
(fitted: the calibration saw these rows) and held out by source (every factor refitted without all rows of the
row's source, as `strata analyze --calibrate` scores leave-one-source-out). Prints a table.

    .venv/bin/python benchmarks/analysis_multi_gpu.py [--data CSV]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from strata.analysis.calibrate import DATA_PATH, fit
from strata.analysis.efficiency import Efficiencies
from strata.analysis.validate import _system, load_cases


def split(case) -> str:
    said = (case.row["system"] + " " + case.row["notes"]).upper()
    sys_ = _system(case.row)
    if sys_.parallel == "pp":
        return f"layer split x{sys_.count}"
    return ("DP + EP" if "EP" in said.replace("EXPERT PARALLEL", "EP") and "DP" in said else "TP") + f" x{sys_.count}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA_PATH), help="measurements CSV (default: the calibration's)")
    args = ap.parse_args()
    cases = load_cases(args.data)
    usable = [c for c in cases if not c.reason]
    multi = [c for c in usable if _system(c.row).count > 1 and _system(c.row).device.cls == "gpu"]
    shipped = Efficiencies.load()
    held = {}
    for source in sorted({c.row["source"] for c in multi}):
        effs = fit([c for c in usable if c.row["source"] != source])
        held.update({c.index: c.predict(effs) for c in multi if c.row["source"] == source})
    print("| engine | model | hardware | split | metric | measured | fitted | held out by source | held out / measured |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in multi:
        fitted = c.predict(shipped)
        print(f"| {c.row['system']} | {c.row['model'].split('/')[-1]} | {c.row['hardware']} | {split(c)} | {c.metric} "
              f"| {c.measured:g} | {fitted:.4g} | {held[c.index]:.4g} | {held[c.index] / c.measured:.2f} |")


if __name__ == "__main__":
    main()
