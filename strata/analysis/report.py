"""Human-readable output of a prediction: per-operator table (summed over layers), totals, and sweeps."""

from __future__ import annotations

from collections import OrderedDict

from strata.analysis.costmodel import StepCost
from strata.analysis.efficiency import Efficiencies
from strata.analysis.predict import Prediction


def op_rows(cost: StepCost, effs: Efficiencies) -> list[dict]:
    """One row per operator name and processor, summed over layers."""
    agg: OrderedDict[tuple[str, str], dict] = OrderedDict()
    for seg in cost.segments:
        if not seg.flops:
            continue
        f, b = seg.op_times(effs)
        for name, fl, by, tf, tb in zip(seg.names, seg.flops, seg.bytes, f, b):
            r = agg.setdefault((name, seg.proc), {"op": name, "proc": seg.proc, "flops": 0.0, "bytes": 0.0,
                                                  "time_s": 0.0, "compute_s": 0.0, "memory_s": 0.0})
            r["flops"] += fl
            r["bytes"] += by
            r["time_s"] += max(tf, tb)
            r["compute_s"] += tf
            r["memory_s"] += tb
    rows = list(agg.values())
    for r in rows:
        r["intensity"] = r["flops"] / r["bytes"] if r["bytes"] else float("inf")
        r["bound"] = "compute" if r["compute_s"] > r["memory_s"] else "memory"
    return rows


def _si(x: float, unit: str = "") -> str:
    for div, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{p}{unit}"
    return f"{x:.2f}{unit}"


def format_table(rows: list[dict], title: str) -> str:
    total = sum(r["time_s"] for r in rows) or 1.0
    lines = [title, f"{'operator':<18}{'proc':<8}{'FLOPs':>10}{'bytes':>10}{'FLOP/B':>9}{'bound':>9}{'time':>11}{'share':>7}"]
    for r in rows:
        lines.append(f"{r['op']:<18}{r['proc']:<8}{_si(r['flops']):>10}{_si(r['bytes'], 'B'):>10}"
                     f"{r['intensity']:>9.1f}{r['bound']:>9}{r['time_s'] * 1e3:>9.3f}ms{r['time_s'] / total:>7.1%}")
    return "\n".join(lines)


def format_totals(p: Prediction, effs: Efficiencies, label: str) -> str:
    j = p.to_json(effs)
    mem = ", ".join(f"{k} {v:.2f} GB" for k, v in j["memory_gb"].items())
    lines = [
        label,
        (f"  TTFT {j['ttft_ms']:.1f} ms | TPOT {j['tpot_ms']:.2f} ms | decode {j['decode_tok_s']:.1f} tok/s per "
         f"sequence | batch {p.batch}: {j['throughput_tok_s']:.1f} tok/s | prefill {j['prefill_tok_s']:.0f} tok/s"),
        f"  memory: {mem}",
        f"  energy: {j['energy_j_per_token']:.3f} J per generated token",
        "  decode time: " + ", ".join(f"{k} {v:.2f} ms" for k, v in j["decode_breakdown_ms"].items()),
    ]
    lines += [f"  note: {n}" for n in j["notes"]]
    return "\n".join(lines)


def format_sweep(results: list[tuple[int, int, Prediction]]) -> str:
    lines = [f"{'batch':>6}{'context':>9}{'TTFT ms':>10}{'TPOT ms':>10}{'tok/s/seq':>11}{'tok/s total':>13}{'KV GB':>8}"]
    for b, ctx, p in results:
        lines.append(f"{b:>6}{ctx:>9}{p.ttft_s * 1e3:>10.1f}{p.tpot_s * 1e3:>10.2f}{p.decode_tok_s:>11.1f}"
                     f"{p.batch / p.tpot_s:>13.1f}{p.memory['kv_cache'] / 1e9:>8.2f}")
    return "\n".join(lines)
