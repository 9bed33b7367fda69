"""Roofline plot (PNG): the device's compute and bandwidth ceilings with operators placed by intensity."""

from __future__ import annotations

import os

import numpy as np

from strata.analysis.hardware import Device


def roofline_png(path: str, dev: Device, phases: dict[str, list[dict]], compute: str = "fp16",
                 eta_bw: float = 1.0, eta_flops: float = 1.0) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak, bw = dev.peak(compute), dev.bw
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = np.geomspace(1e-2, 1e5, 200)
    ax.loglog(xs, np.minimum(peak, xs * bw), "k-", label=f"peak ({compute} {peak / 1e12:.1f} TFLOP/s, {bw / 1e9:.0f} GB/s)")
    ax.loglog(xs, np.minimum(peak * eta_flops, xs * bw * eta_bw), "k--", label="calibrated ceiling")
    markers = {"prefill": "o", "decode": "s"}
    for phase, rows in phases.items():
        for r in rows:
            if not r["bytes"] or not r["time_s"] or r["proc"] != "device":
                continue
            ai = max(r["intensity"], 1e-2)
            ax.scatter([ai], [r["flops"] / r["time_s"] if r["flops"] else 1e6], marker=markers.get(phase, "x"),
                       alpha=0.75)
            ax.annotate(f"{r['op']} ({phase[0]})", (ai, max(r["flops"] / r["time_s"], 1e6)), fontsize=6)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("attained FLOP/s")
    ax.set_title(f"Roofline: {dev.name}")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path
