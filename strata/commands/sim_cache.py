"""`strata sim-cache`: replay routing traces through every eviction policy x prefetcher x budget."""

from __future__ import annotations

import json
import os
import sys

from strata.errors import StrataError


def register(sub) -> None:
    p = sub.add_parser("sim-cache", help="simulate expert caching on a routing trace (hit rate, bytes, Belady gap)")
    p.add_argument("--trace", action="append", required=True,
                   help="routing trace JSONL (Strata's or the Mixtral collector's); repeat to serve several in turn")
    p.add_argument("--budgets", default="0.125,0.25,0.5",
                   help="cache sizes as fractions of all (layer, expert) slots, comma-separated")
    p.add_argument("--policies", default="lru,lfu,lfru,score,nextuse", help="online eviction policies")
    p.add_argument("--prefetchers", default="none,affinity,temporal,hybrid", help="next-layer predictors")
    p.add_argument("--layout", choices=["global", "per-layer"], default="global", help="one pool or one per layer")
    p.add_argument("--expert-bytes", type=int, default=None,
                   help="bytes per expert read (default: from --model, else a Mixtral-8x7B bf16 expert)")
    p.add_argument("--model", default=None, help="checkpoint folder whose config.json sizes one expert")
    p.add_argument("--prefetch-k", type=int, default=None, help="experts predicted per layer (default: top-k)")
    p.add_argument("--min-prob", type=float, default=0.3,
                   help="prefetch only experts whose estimated probability of use exceeds this")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", default=None, help="write hit rate against budget as a PNG")
    p.set_defaults(func=run)


def _expert_bytes(args) -> int:
    from strata.tiers.simulate import MIXTRAL_8X7B_EXPERT_BYTES

    if args.expert_bytes:
        return args.expert_bytes
    if args.model:
        from strata.models.registry import load_config

        cfg = load_config(args.model)
        dtype_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}[cfg.torch_dtype]
        return cfg.expert_param_count * dtype_bytes
    return MIXTRAL_8X7B_EXPERT_BYTES


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StrataError(f"--{what} must be comma-separated numbers, got {text!r}") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise StrataError(f"--{what} must be fractions in (0, 1], got {text!r}")
    return vals


def format_table(report: dict) -> str:
    from strata.tiers.budget import format_size

    title = (f"trace {report['trace']}: {report['num_tokens']} tokens, {report['num_layers']} layers x "
             f"{report['num_experts']} experts, top-{report['top_k']}, {report['layout']} pool, "
             f"{format_size(report['expert_bytes'])} per expert")
    header = (f"{'budget':>7} {'policy':>8} {'prefetch':>9} {'hit rate':>9} {'of Belady':>9} {'bytes read':>11} "
              f"{'vs Belady':>9} {'coverage':>9} {'waste':>10}")
    lines = [title, header]
    for b in report["belady"]:
        rows = [r for r in report["results"] if r["budget_fraction"] == b["budget_fraction"]]
        lines.append(f"{b['budget_fraction']:>7.3f} {'belady':>8} {'none':>9} {b['hit_rate']:>9.3f} {1:>9.2f} "
                     f"{format_size(b['bytes_read']):>11} {1:>9.2f} {'-':>9} {'-':>10}")
        for r in sorted(rows, key=lambda r: -r["hit_rate"]):
            vs = r["bytes_read"] / b["bytes_read"] if b["bytes_read"] else 0.0
            lines.append(f"{'':>7} {r['policy']:>8} {r['prefetch']:>9} {r['hit_rate']:>9.3f} "
                         f"{r['fraction_of_belady']:>9.2f} {format_size(r['bytes_read']):>11} {vs:>9.2f} "
                         f"{r['prefetch_coverage']:>9.3f} {format_size(r['prefetch_waste_bytes']):>10}")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    budgets = [b["budget_fraction"] for b in report["belady"]]
    for ax, pf in zip(axes, ["none", "best"]):
        for pol in dict.fromkeys(r["policy"] for r in report["results"]):
            ys = []
            for b in budgets:
                rows = [r for r in report["results"] if r["policy"] == pol and r["budget_fraction"] == b
                        and (pf == "best" or r["prefetch"] == "none")]
                ys.append(max((r["hit_rate"] for r in rows), default=float("nan")))
            ax.plot(budgets, ys, marker="o", label=pol)
        ax.plot(budgets, [b["hit_rate"] for b in report["belady"]], "k--", marker="s", label="Belady (demand)")
        ax.set_xlabel("cache budget (fraction of all experts)")
        ax.set_ylabel("hit rate")
        ax.set_title("no prefetch" if pf == "none" else "best prefetcher per policy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(os.path.basename(report["trace"]), fontsize=9)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run(args) -> int:
    from strata.tiers.policies import ONLINE_POLICIES
    from strata.tiers.predictors import PREFETCHERS
    from strata.tiers.simulate import sweep
    from strata.tiers.trace import read_traces

    policies = [p for p in args.policies.split(",") if p]
    prefetchers = [p for p in args.prefetchers.split(",") if p]
    for p in policies:
        if p not in ONLINE_POLICIES:
            raise StrataError(f"--policies: unknown policy {p!r}; expected some of {', '.join(ONLINE_POLICIES)} "
                              "(Belady is always reported)")
    for p in prefetchers:
        if p not in PREFETCHERS:
            raise StrataError(f"--prefetchers: unknown prefetcher {p!r}; expected some of {', '.join(PREFETCHERS)}")
    trace = read_traces(args.trace)
    report = sweep(trace, _floats(args.budgets, "budgets"), policies, prefetchers, args.layout,
                   _expert_bytes(args), args.prefetch_k, args.min_prob, progress=sys.stderr.isatty())
    if args.plot:
        plot(report, args.plot)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0
