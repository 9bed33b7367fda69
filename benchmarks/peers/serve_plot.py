"""Throughput against p99 TTFT, one curve per server and model, from the JSON lines of `strata bench serve`
(as serve_side_by_side.py writes them); prints the table of output tok/s ratios at each rate.

    .venv/bin/python benchmarks/peers/serve_plot.py docs/benchmarks/serving.jsonl \\
        --png docs/benchmarks/serving_throughput_ttft.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def load(path: str) -> dict[str, list[dict]]:
    """label ("model/server") -> records, lowest offered rate first (inf last)."""
    runs: dict[str, list[dict]] = defaultdict(list)
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
            "llama-server p99 TTFT ms |")
    rows = [head, "|---|---|---|---|---|---|---|"]
    models = sorted({label.split("/")[0] for label in runs})
    for model in models:
        a = {r["request_rate"]: r for r in runs.get(f"{model}/{ours}", [])}
        b = {r["request_rate"]: r for r in runs.get(f"{model}/{peer}", [])}
        for rate in sorted(a.keys() & b.keys(), key=float):
            x, y = a[rate], b[rate]
            ratio = x["output_token_throughput"] / max(y["output_token_throughput"], 1e-9)
            rows.append(f"| {model} | {rate} | {x['output_token_throughput']:.0f} | {y['output_token_throughput']:.0f} "
                        f"| {ratio:.2f}x | {x['p99_ttft_ms']:.0f} | {y['p99_ttft_ms']:.0f} |")
    return "\n".join(rows)


def plot(runs: dict[str, list[dict]], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({label.split("/")[0] for label in runs})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for label, recs in sorted(runs.items()):
            if label.split("/")[0] != model:
                continue
            xs = [r["p99_ttft_ms"] / 1000 for r in recs]
            ys = [r["output_token_throughput"] for r in recs]
            ax.plot(xs, ys, marker="o", label=label.split("/", 1)[1])
            for x, y, r in zip(xs, ys, recs):
                ax.annotate(r["request_rate"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
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
    ap.add_argument("jsonl")
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    runs = load(args.jsonl)
    print(ratio_table(runs))
    if args.png:
        plot(runs, args.png)


if __name__ == "__main__":
    main()
