"""Kernel-level benchmark of the quantized linear layer: decode GEMV and batched prefill per format.

    .venv/bin/python benchmarks/quant_kernels.py                 # K=4096, N=14336 (an 8B model's FFN)
    .venv/bin/python benchmarks/quant_kernels.py --rows 1,4 --formats int8,int4-g64 --reps 5

Every call runs on the next of several copies of the layer, together more than --rotate-mib of weights,
so the numbers are DRAM-bound like a real decode step, not cache-resident. The machine's read bandwidth
is measured in the same run (torch fp32 sum over 256 MiB, best of 10, before every case), and each row reports weight bytes
per second and the fraction of that roofline; batched rows report speed relative to the bf16 matmul at
the same number of rows. Peers: bf16 F.linear (and Strata's bf16 GEMV, case `bf16 native`), torch._weight_int8pack_mm, aten._weight_int4pack_mm_for_cpu.
Cases ending in `a8` run the same weights on int8 activations (--quantized-activations int8) at every row count.
Results: docs/benchmarks/quant_kernels.json and .md. Median and best timings are both kept; the derived
columns use the best run (and the best bandwidth sample), because other processes may share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
from torch import nn

from strata.fileio import write_text_atomic
from strata.layers.linear import linear
from strata.layers.quant_linear import QuantLinear
from strata.quant import ggml_blocks, kquant

OUT = ROOT / "docs" / "benchmarks" / "quant_kernels"
# (label, format or None for bf16, backend)
CASES = [  # bf16 F.linear runs alongside every case
    ("bf16 native", None, "native"),  # strata.layers.linear: AVX-512 bf16 GEMV up to 4 rows, else F.linear
    ("int8", "int8", "native"),
    ("int4-g32", "int4-g32", "native"),
    ("int4-g64", "int4-g64", "native"),
    ("int4-g128", "int4-g128", "native"),
    ("int4-g64-asym", "int4-g64-asym", "native"),
    ("int8-nested-g64", "int8-nested-g64", "native"),
    ("fp8", "fp8", "native"),
    ("q4_k", "q4_k", "native"),  # K-quant blocks as in GGUF (random blocks: Strata does not quantize into them)
    ("q5_k", "q5_k", "native"),
    ("q6_k", "q6_k", "native"),
    ("q8_0", "q8_0", "native"),  # GGUF's 32-weight blocks (random blocks)
    ("q4_1", "q4_1", "native"),
    # int8 activations (quant_cpu_a8.c, AVX-512 VNNI) at every row count, decode rows included: QuantLinear
    # with quantized_activations = "int8" and gemv_max_rows = 0
    *((f"{name} a8", name, "native-a8") for name in ("int8", "int4-g32", "int4-g128", "q4_k", "q5_k", "q6_k", "q8_0",
                                                      "q4_1")),
    ("torch int8pack", "int8", "torch"),
    ("torch int4pack g64", "int4-g64", "torch"),
]


def measure_bandwidth(mib: int = 256, reps: int = 10) -> float:
    """Read bandwidth: torch fp32 sum over 8x the L3 size, best of `reps` (others may share the cores)."""
    a = torch.ones(mib * 2**20 // 4)
    best = min(_time(lambda: a.sum()) for _ in range(reps))
    return a.numel() * 4 / best / 1e9


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def _time(fn) -> float:
    t = _clock()
    fn()
    return _clock() - t


def make_copies(w: torch.Tensor, fmt: str | None, backend: str | None, rotate_bytes: int):
    if backend == "native-a8":
        layers, nbytes = make_copies(w, fmt, "native", rotate_bytes)
        if not layers[0]._a8:
            raise SystemExit(f"case {fmt} a8: no int8-activation kernel on this machine (AVX-512 VNNI)")
        for q in layers:
            q.quantized_activations, q.gemv_max_rows = "int8", 0
        return layers, nbytes
    if fmt is None:
        base = w.to(torch.bfloat16)
        nbytes = base.numel() * 2
        copies = [base] + [base.clone() for _ in range(max(1, -(-rotate_bytes // nbytes)) - 1)]
        fns = [partial(linear if backend == "native" else torch.nn.functional.linear, weight=c) for c in copies]
        fns[0].rel_error = 0.0
        return fns, nbytes
    if fmt in kquant.BLOCK_BYTES or fmt in ggml_blocks.BLOCK_BYTES:  # GGUF blocks: kept, never made by Strata
        first = QuantLinear(w.shape[1], w.shape[0], fmt)
        first.qweight = (kquant if fmt in kquant.BLOCK_BYTES else ggml_blocks).random_blocks(
            fmt, w.shape[0], w.shape[1], scale=1e-4)
        first.post_load(backend)
        first.rel_error = None  # random blocks, not a quantization of w
    else:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w
        first = QuantLinear.from_float(lin, fmt, backend=backend)
        first.rel_error = float((first.dequantize(torch.float32) - w).norm() / w.norm())
    nbytes = first.fmt.nbytes(first.out_features, first.in_features)
    layers = [first]
    for _ in range(max(1, -(-rotate_bytes // nbytes)) - 1):
        q = QuantLinear(first.in_features, first.out_features, fmt)
        for name, t in first._tensors().items():
            setattr(q, name, t.clone())
        q.post_load(backend)
        layers.append(q)
    return layers, nbytes


READ_MIB = 64  # each bandwidth probe sums a fresh 64 MiB fp32 buffer (2x the L3)


def run_triplets(base, copies, reads, rows: int, k: int, reps: int):
    """Alternate a bf16 call, a case call and a bandwidth probe, so all three see the same disturbance
    from other processes. Returns the three lists of seconds."""
    x = torch.randn(rows, k).to(torch.bfloat16)
    tb, tq, tr = [], [], []
    for r in range(reps + 2):
        lb, lq, buf = base[r % len(base)], copies[r % len(copies)], reads[r % len(reads)]
        b = _time(lambda layer=lb: layer(x))
        q = _time(lambda layer=lq: layer(x))
        s = _time(buf.sum)
        if r >= 2:  # two warm-up rounds
            tb.append(b)
            tq.append(q)
            tr.append(s)
    return tb, tq, tr


def _paired_frac(nbytes: int, ts: list[float], tr: list[float]) -> float:
    """Median over rounds of (weight bytes / time) / (probe bytes / probe time): share of the bandwidth."""
    return statistics.median((nbytes / t) / (READ_MIB * 2**20 / r) for t, r in zip(ts, tr))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=4096, help="in_features")
    ap.add_argument("--n", type=int, default=14336, help="out_features")
    ap.add_argument("--rows", default="1,16,64,256", help="activation rows (batch x tokens)")
    ap.add_argument("--formats", default="", help="comma-separated case labels (default: all)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rotate-mib", type=int, default=300, help="weights rotated through (> the caches)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default=str(OUT), help="output path without extension (.json and .md)")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="cpu: process CPU time, which leaves out the time other jobs held the core (--threads 1 only)")
    args = ap.parse_args(argv)
    global _clock
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu measures one thread's time; use it with --threads 1")
    _clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    wanted = set(args.formats.split(",")) if args.formats else None
    cases = [c for c in CASES if wanted is None or c[0] in wanted]
    bw = measure_bandwidth()
    print(f"read bandwidth {bw:.1f} GB/s ({args.threads} threads); K={args.k} N={args.n}", file=sys.stderr)
    torch.manual_seed(0)
    w = torch.randn(args.n, args.k) * 0.02
    base = make_copies(w, None, None, args.rotate_mib * 2**20)[0]
    reads = [torch.ones(READ_MIB * 2**20 // 4) for _ in range(-(-args.rotate_mib // READ_MIB))]
    nb = args.n * args.k * 2
    results, bf16, bf16_frac = [], {m: [] for m in rows}, {m: [] for m in rows}
    for label, fmt, backend in cases:
        bw = max(bw, measure_bandwidth())  # the best the machine gave during the run
        copies, nbytes = make_copies(w, fmt, backend, args.rotate_mib * 2**20)
        for m in rows:
            tb, tq, tr = run_triplets(base, copies, reads, m, args.k, args.reps * (4 if m <= 4 else 1))
            bf16[m] += tb
            bf16_frac[m].append(_paired_frac(nb, tb, tr))
            ratio = statistics.median(b / q for b, q in zip(tb, tq))
            results.append(_row(label, fmt, backend, m, tq, nbytes, ratio))
            r = results[-1]
            r["weight_rel_rms_error"] = None if copies[0].rel_error is None else round(copies[0].rel_error, 5)
            r["roofline_frac"] = round(_paired_frac(nbytes, tq, tr), 3)
            print(f"{label:20s} M={m:4d} {r['median_ms']:8.2f} ms (best {r['best_ms']:7.2f}) "
                  f"{100 * r['roofline_frac']:4.0f}% of bandwidth  x{ratio:.2f} vs bf16", file=sys.stderr)
        del copies
    bf16_rows = [_row("bf16 F.linear", None, None, m, bf16[m], nb, 1.0) for m in rows]
    for r in bf16_rows:
        r["roofline_frac"] = round(statistics.median(bf16_frac[r["rows"]]), 3)
    results = bf16_rows + results
    machine = {"cpu": _cpu_name(), "threads": args.threads, "clock": args.clock, "read_bandwidth_gbps": round(bw, 1),
               "torch": torch.__version__, "python": platform.python_version(), "load_avg": os.getloadavg()}
    payload = {"machine": machine, "k": args.k, "n": args.n, "rotate_mib": args.rotate_mib, "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")
    table = markdown(payload)
    write_text_atomic(out.with_suffix(".md"), table)
    print(table)
    return 0


def _row(label, fmt, backend, m, ts, nbytes, ratio) -> dict:
    med, best = statistics.median(ts) * 1e3, min(ts) * 1e3
    return {"case": label, "format": fmt or "bf16", "backend": backend or "torch", "rows": m,
            "median_ms": round(med, 3), "best_ms": round(best, 3), "weight_bytes": nbytes,
            "weight_gbps": round(nbytes / best / 1e6, 2), "vs_bf16": round(ratio, 3)}


def markdown(p: dict) -> str:
    m = p["machine"]
    lines = [
        "# Quantized linear kernels (benchmarks/quant_kernels.py)", "",
        (f"CPU: {m['cpu']}, {m['threads']} threads, {m.get('clock', 'wall')} clock, torch {m['torch']}. Layer K={p['k']} -> N={p['n']}, "
         f"rotating over {p['rotate_mib']} MiB of Gaussian weights. "
         f"Read bandwidth (torch fp32 sum, best during the run): "
         f"**{m['read_bandwidth_gbps']} GB/s**. Load average at the end: "
         f"{', '.join(f'{x:.1f}' for x in m['load_avg'])} (other jobs shared the cores: expect noise)."), "",
        ("Each round runs a bf16 call, the case, and a bandwidth probe (sum of a fresh 64 MiB fp32 buffer) back to "
         "back, so all three see the same disturbance. % of bandwidth = median over rounds of the case's weight "
         "bytes/s divided by the probe's bytes/s; speed vs bf16 = median of the bf16/case time ratios. "
         "Weight GB/s uses the best run."), "",
        "| case | rows | median ms | best ms | weight GB/s | % of bandwidth | speed vs bf16 | weight rel. RMS error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in p["results"]:
        vs = f"{r['vs_bf16']:.2f}x" if r["vs_bf16"] is not None else "-"
        err = f"{r['weight_rel_rms_error']:.4f}" if r.get("weight_rel_rms_error") is not None else "-"
        lines.append(f"| {r['case']} | {r['rows']} | {r['median_ms']:.2f} | {r['best_ms']:.2f} | "
                     f"{r['weight_gbps']:.1f} | {100 * r['roofline_frac']:.0f}% | {vs} | {err} |")
    return "\n".join(lines + summary(p["results"])) + "\n"


def summary(results: list[dict]) -> list[str]:
    """The questions the kernel benchmark answers (bandwidth shares, ratios to bf16), from this run's numbers."""
    by = {(r["case"], r["rows"]): r for r in results}
    rows = sorted({r["rows"] for r in results})
    out = ["", "## Summary", ""]
    decode = [r for r in results if r["rows"] == 1 and r["case"] != "bf16 F.linear"]
    if decode:
        out.append("- Decode (1 row), share of the read bandwidth: " + ", ".join(
            f"{r['case']} {100 * r['roofline_frac']:.0f}%" for r in decode) + ".")
    big = [m for m in rows if m >= 64]
    for m in big:
        ours = [r for r in results if r["rows"] == m and r["backend"].startswith("native")]
        if ours:
            out.append(f"- {m} rows, speed relative to the bf16 matmul: " + ", ".join(
                f"{r['case']} {r['vs_bf16']:.2f}x" for r in ours) + ".")
    if ("fp8", 1) in by and ("int8", 1) in by:
        f8, i8 = by[("fp8", 1)], by[("int8", 1)]
        out.append(f"- FP8 vs INT8 (both 8 bits, per channel): decode {f8['best_ms']:.2f} vs {i8['best_ms']:.2f} ms; "
                   f"relative weight error {f8['weight_rel_rms_error']:.4f} vs {i8['weight_rel_rms_error']:.4f} "
                   f"(ratio fp8/int8 {f8['weight_rel_rms_error'] / i8['weight_rel_rms_error']:.2f}).")
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
