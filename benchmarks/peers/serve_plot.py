"""Throughput against p99 TTFT, one panel per model and one curve per server, from the JSON lines of `strata
bench serve` (as serve_side_by_side.py writes them, one or more files); prints the table of output tok/s ratios
at each rate.

    .venv/bin/python benchmarks/peers/serve_plot.py docs/benchmarks/serving.jsonl \\
        docs/benchmarks/serving_olmoe.jsonl --png docs/benchmarks/serving_throughput_ttft.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def load(paths: list[str]) -> dict[str, list[dict]]:
    """label ("model/server") -> records of all files, lowest offered rate first (inf last)."""
    runs: dict[str, list[dict]] = defaultdict(list)
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    runs[r["label"]].append(r)
    for recs in runs.values():
        recs.sort(key=lambda r: float(r["request_rate"]))
    return dict(runs)


def ratio_table(runs: dict[str, list[dict]], ours: str = "strata", peer: str = "llama-server") -> str:
    head = ("| model | rate (req/s) | strata tok/s | llama-server tok/s | ratio | strata p99 TTFT ms | "
            "llama-server p99 TTFT ms | strata / llama-server p50 TPOT ms |")
    rows = [head, "|---|---|---|---|---|---|---|---|"]
    models = sorted({label.split("/")[0] for label in runs})
    for model in models:
        a = {r["request_rate"]: r for r in runs.get(f"{model}/{ours}", [])}
        b = {r["request_rate"]: r for r in runs.get(f"{model}/{peer}", [])}
        for rate in sorted(a.keys() & b.keys(), key=float):
            x, y = a[rate], b[rate]
            ratio = x["output_token_throughput"] / max(y["output_token_throughput"], 1e-9)
            rows.append(f"| {model} | {rate} | {x['output_token_throughput']:.0f} | {y['output_token_throughput']:.0f} "
                        f"| {ratio:.2f}x | {x['p99_ttft_ms']:.0f} | {y['p99_ttft_ms']:.0f} "
                        f"| {x['p50_tpot_ms']:.3g} / {y['p50_tpot_ms']:.3g} |")
    return "\n".join(rows)


def plot(runs: dict[str, list[dict]], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    models = sorted({label.split("/")[0] for label in runs})
    ncols = min(len(models), 2)
    nrows = (len(models) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    for ax, model in zip(axes.flat, models):
        for label, recs in sorted(runs.items()):
            if label.split("/")[0] != model:
                continue
            xs = [r["p99_ttft_ms"] / 1000 for r in recs]
            ys = [r["output_token_throughput"] for r in recs]
            ax.plot(xs, ys, marker="o", label=label.split("/", 1)[1])
            for x, y, r in zip(xs, ys, recs):
                ax.annotate(r["request_rate"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor ticks of a short log range crowd the axis
        ax.set_xlabel("p99 TTFT (s, log)")
        ax.set_ylabel("output tokens/s")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Throughput against p99 TTFT (points: offered req/s)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jsonl", nargs="+")
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    runs = load(args.jsonl)
    print(ratio_table(runs))
    if args.png:
        plot(runs, args.png)


if __name__ == "__main__":
    main()
