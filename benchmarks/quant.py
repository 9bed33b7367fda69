"""Benchmark: decode (batch 1) and prefill tokens/s of Strata bf16 / int8 / int4-g64 / fp8 against
llama.cpp bf16 / Q8_0 / Q4_0 on GGUFs of the same weights, each with its memory-bandwidth roofline fraction.

    .venv/bin/python benchmarks/quant.py --models dense-1b,olmoe-1b-7b-2l --rounds 3

Each Strata run is followed directly by its llama.cpp pair, and the whole sequence repeats `--rounds` times:
on this shared VM the machine's speed drifts by up to 1.5x within minutes, so the ratio is taken per round
(pairs a minute apart) and the median reported, with every round kept in the JSON.

Needs llama-cpp-python (benchmarks/peers/install_llamacpp.sh) for the peer columns.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from strata.fileio import write_json_atomic

STRATA_FORMATS = ["bf16", "int8", "int4-g64", "fp8"]
PEER_FORMATS = {"bf16": "bf16", "int8": "q8_0", "int4-g64": "q4_0"}
# bytes per weight, scales included (int4-g64: fp16 scale per 64; q4_0: fp16 per 32; q8_0: fp16 per 32)
STRATA_BPW = {"bf16": 2.0, "int8": 1.0, "int4-g64": 0.5 + 2 / 64, "fp8": 1.0}
PEER_BPW = {"bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
# lm_head: Strata's quantized models keep it in int8 (`strata quantize --lm-head int8`); llama.cpp's quantize
# writes output.weight as q8_0 for Q8_0 and q6_K (6.5625 bits) for Q4_0 (read from the GGUFs)
STRATA_HEAD_BPW = {"bf16": 2.0, "int8": 1.0, "int4-g64": 1.0, "fp8": 1.0}
PEER_HEAD_BPW = {"bf16": 2.0, "q8_0": 34 / 32, "q4_0": 210 / 256}


def quantized_folder(src: Path, fmt: str) -> Path:
    """The model in `fmt` with lm_head in int8, made once (round-to-nearest scales: speed does not depend on
    how the scales were chosen, and it is the fastest to write)."""
    if fmt == "bf16":
        return src
    from strata.weights.quantize_checkpoint import quantize_checkpoint, scan

    dst = src.parent / f"{src.name}-{fmt}-head8"
    if not (dst / "config.json").exists():
        modules = {m: fmt for m in scan(src)[0]}
        modules["lm_head"] = "int8"
        quantize_checkpoint(src, dst, modules=modules, progress=False, method="rtn")
    return dst


def main() -> None:
    from benchmarks.core import _child, _prompt
    from benchmarks.synthetic import memory_bandwidth_gbs, synthetic_model, weight_bytes_per_token
    from strata.analysis.probe import strata_bf16_gemv_gbs
    from strata.models.registry import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="dense-1b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="repeat every run; medians are reported")
    ap.add_argument("--formats", default=",".join(STRATA_FORMATS), help="Strata formats (each with its llama.cpp pair)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "quant.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    runs = []  # (model, engine, format, pairs_with, callable, bytes per token)
    for name in args.models.split(","):
        base, _, layers = name.rpartition("-")  # "olmoe-1b-7b-2l": the preset cut to 2 layers
        src = synthetic_model(base, int(layers[:-1])) if layers[:-1].isdigit() and layers.endswith("l") else \
            synthetic_model(name)
        cfg = load_config(src)
        head_params = cfg.vocab_size * cfg.hidden_size
        linear_params = weight_bytes_per_token(cfg, 1.0) - head_params
        ids = _prompt(cfg.vocab_size, args.prompt_len)
        for fmt in args.formats.split(","):  # each Strata run directly followed by its peer: both see the same machine
            path = str(quantized_folder(Path(src), fmt))
            runs.append((name, "strata", fmt, None, lambda p=path: _child("strata", p, args.prompt_len, args.decode,
                                                                          args.threads),
                         linear_params * STRATA_BPW[fmt] + head_params * STRATA_HEAD_BPW[fmt]))
            qtype = PEER_FORMATS.get(fmt)
            if qtype and not args.no_peer:
                runs.append((name, "llama.cpp", qtype, fmt, lambda s=src, q=qtype, i=ids: _peer(s, q, i, args),
                             linear_params * PEER_BPW[qtype] + head_params * PEER_HEAD_BPW[qtype]))
    results = {i: [] for i in range(len(runs))}
    bws = []
    for rnd in range(args.rounds):
        bws.append(memory_bandwidth_gbs())
        for i, run in enumerate(runs):
            # Strata's bf16 GEMV rate (the ceiling its decode streams at; torch runs at args.threads here), just
            # before each run: the machine drifts within a round
            g = strata_bf16_gemv_gbs(4096, 4096, 12)
            results[i].append(dict(run[4](), gemv_bf16_gb_s=g))
            print(rnd, run[:3], results[i][-1], file=sys.stderr)
    bw = statistics.median(bws)
    rows = []
    for i, (name, engine, fmt, pairs_with, _, bytes_tok) in enumerate(runs):
        ok = [r for r in results[i] if "error" not in r]
        row = {"model": name, "engine": engine, "format": fmt, "bytes_per_token": bytes_tok, "rounds": results[i],
               "roofline_tok_s": bw * 1e9 / bytes_tok}
        if pairs_with:
            row["pairs_with"] = pairs_with
        if ok:
            row.update({k: statistics.median(r[k] for r in ok) for k in ("prefill_tok_s", "decode_tok_s",
                                                                          "gemv_bf16_gb_s")})
        else:
            row["error"] = results[i][0]["error"]
        rows.append(row)
    by_key = {(r["model"], r["engine"], r["format"]): r for r in rows}
    for r in rows:  # ratio per round (a Strata run and the peer run right after it), then the median
        p = by_key.get((r["model"], "llama.cpp", PEER_FORMATS.get(r["format"], ""))) if r["engine"] == "strata" else None
        if p and "error" not in r and "error" not in p:
            pairs = [(a["decode_tok_s"] / b["decode_tok_s"], a["prefill_tok_s"] / b["prefill_tok_s"])
                     for a, b in zip(r["rounds"], p["rounds"]) if "error" not in a and "error" not in b]
            r["decode_vs_llamacpp"] = statistics.median(d for d, _ in pairs)
            r["prefill_vs_llamacpp"] = statistics.median(f for _, f in pairs)
            r["decode_vs_llamacpp_rounds"] = [d for d, _ in pairs]
    gemv = [r["gemv_bf16_gb_s"] for res in results.values() for r in res]
    machine = {"memory_read_gb_s": bw, "memory_read_gb_s_rounds": bws, "gemv_bf16_gb_s": statistics.median(gemv),
               "threads": args.threads,
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg": os.getloadavg(),
               "rounds": args.rounds, "decode_tokens": args.decode, "prompt_tokens": args.prompt_len}
    write_json_atomic(args.out, {"machine": machine, "rows": rows})
    print(f"\nmemory read bandwidth {bw:.1f} GB/s (median of {', '.join(f'{b:.0f}' for b in bws)}), {args.threads} "
          f"threads, load avg {machine['load_avg'][0]:.1f}, medians of {args.rounds} rounds\n")
    print("| model | engine | format | prefill tok/s | decode tok/s | roofline tok/s | fraction | decode vs llama.cpp "
          "(per round) | prefill vs llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['engine']} | {r['format']} | error: {r['error']} | | | | | |")
            continue
        ratio = (f"**{r['decode_vs_llamacpp']:.2f}x** ({', '.join(f'{x:.2f}' for x in r['decode_vs_llamacpp_rounds'])})"
                 if "decode_vs_llamacpp" in r else "")
        pre = f"{r['prefill_vs_llamacpp']:.2f}x" if "prefill_vs_llamacpp" in r else ""
        print(f"| {r['model']} | {r['engine']} | {r['format']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | "
              f"{r['roofline_tok_s']:.1f} | {r['decode_tok_s'] / r['roofline_tok_s']:.0%} | {ratio} | {pre} |")


def _peer(src, qtype: str, ids: list[int], args) -> dict:
    from benchmarks.peers.llamacpp import bench_llamacpp, gguf_for

    try:
        r = bench_llamacpp(gguf_for(src, qtype), ids, args.decode, n_threads=args.threads)
        return {"prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"]}
    except Exception as e:  # noqa: BLE001 - the peer is optional: report why it has no number
        return {"error": str(e).splitlines()[-1][:200]}


if __name__ == "__main__":
    main()
