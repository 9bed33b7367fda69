"""Benchmark: one GGUF file run by Strata and by llama.cpp, decode (batch 1) and prefill tokens/s, side by side.

    .venv/bin/python benchmarks/gguf_peer.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --threads 1,2 --rounds 3

Strata opens the file as a user would (`LLM("FILE.gguf", dtype="bfloat16")`: Q4_0/Q8_0/Q4_1 and K-quant tensors
stay as their blocks, bf16 activations); llama.cpp is llama-cpp-python on the same file. Each round measures
the memory read bandwidth, then for each thread count a Strata run directly followed by its llama.cpp run (each
in a fresh process), so the ratio is taken per round and the median reported with the spread of the rounds.
The roofline is bandwidth / bytes read per decode token (every tensor of the file except the embedding
lookup's one row: the tied embedding is read whole as the output projection).

`--quantized-activations none,int8` adds a Strata run per mode (each in its own process, beside the same
round's llama.cpp run); rows name the mode. Needs llama-cpp-python (benchmarks/peers/install_llamacpp.sh) for
the peer columns.
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


def decode_bytes(path: str) -> int:
    """Bytes of every tensor in the file (what one decode token reads, the embedding lookup's row aside)."""
    from strata.weights.gguf_reader import GGUFFile

    return sum(int(t.raw.n_bytes) for t in GGUFFile(path).tensors.values())


def _peer(path: str, ids: list[int], decode: int, threads: int) -> dict:
    from benchmarks.peers.llamacpp import bench_llamacpp

    try:
        r = bench_llamacpp(path, ids, decode, n_threads=threads)
        return {"prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"]}
    except Exception as e:  # noqa: BLE001 - the peer is optional: report why it has no number
        return {"error": str(e).splitlines()[-1][:200]}


def _spread(values: list[float], digits: int = 1) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def main() -> None:
    from benchmarks.child import run_child
    from benchmarks.core import _prompt
    from benchmarks.synthetic import memory_bandwidth_gbs
    from strata.weights.gguf_cache import converted_folder

    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quantized-activations", default="none",
                    help="comma-separated Strata modes (none, int8), one Strata run each per round")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "gguf_peer.json"))
    args = ap.parse_args()
    import torch

    path = str(Path(args.gguf).resolve())
    converted_folder(path)  # the one-time conversion is not part of any timed run
    from strata.weights.gguf_reader import GGUFFile

    vocab = len(GGUFFile(path).require("tokenizer.ggml.tokens"))
    ids = _prompt(vocab, args.prompt_len)
    nbytes = decode_bytes(path)
    threads = [int(t) for t in args.threads.split(",")]
    modes = args.quantized_activations.split(",")
    rounds = []
    for rnd in range(args.rounds):
        entry = {"load_avg": os.getloadavg()}
        for t in threads:
            torch.set_num_threads(t)
            entry[t] = {"memory_read_gb_s": memory_bandwidth_gbs(),
                        **{f"strata/{m}": run_child("benchmarks.core", "run_strata", path, args.prompt_len,
                                                    args.decode, t, m) for m in modes},
                        "llama.cpp": _peer(path, ids, args.decode, t)}
            print(rnd, t, entry[t], file=sys.stderr)
        rounds.append(entry)
    rows = []
    for t in threads:
        for mode in modes:
            rs = [{"strata": r[t][f"strata/{mode}"], "llama.cpp": r[t]["llama.cpp"]} for r in rounds]
            row = {"threads": t, "quantized_activations": mode, "bytes_per_token": nbytes,
                   "memory_read_gb_s": [r[t]["memory_read_gb_s"] for r in rounds]}
            for eng in ("strata", "llama.cpp"):
                ok = [r[eng] for r in rs if "error" not in r[eng]]
                row[eng] = {k: [r[k] for r in ok] for k in ("decode_tok_s", "prefill_tok_s")}
                if not ok:
                    row[eng]["error"] = rs[0][eng]["error"]
            pairs = [r for r in rs if "error" not in r["strata"] and "error" not in r["llama.cpp"]]
            row["decode_ratio"] = [r["strata"]["decode_tok_s"] / r["llama.cpp"]["decode_tok_s"] for r in pairs]
            row["prefill_ratio"] = [r["strata"]["prefill_tok_s"] / r["llama.cpp"]["prefill_tok_s"] for r in pairs]
            rows.append(row)
    machine = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "cpus": os.cpu_count(),
               "load_avg_rounds": [r["load_avg"] for r in rounds], "rounds": args.rounds,
               "prompt_tokens": args.prompt_len, "decode_tokens": args.decode, "gguf": Path(path).name}
    write_json_atomic(args.out, {"machine": machine, "rows": rows})
    med = statistics.median
    print(f"\n{Path(path).name}, {nbytes / 1e6:.1f} MB read per decode token, prompt {args.prompt_len} tokens, "
          f"{args.decode} decoded, medians of {args.rounds} rounds (min-max), load avg "
          f"{_spread([r['load_avg'][0] for r in rounds])}\n")
    print("| threads | Strata activations | memory read GB/s | roofline tok/s | Strata decode tok/s | "
          "llama.cpp decode tok/s | **decode Strata / llama.cpp** | Strata prefill tok/s | llama.cpp prefill tok/s | "
          "prefill ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        bw, s, p = row["memory_read_gb_s"], row["strata"], row["llama.cpp"]
        cells = [f"{med(v):.1f} ({_spread(v)})" if v else "error" for v in
                 (s["decode_tok_s"], p["decode_tok_s"])]
        ratio = f"**{med(row['decode_ratio']):.2f}x** ({_spread(row['decode_ratio'], 2)})" if row["decode_ratio"] else ""
        pre = [f"{med(v):.0f} ({min(v):.0f}-{max(v):.0f})" if v else "error" for v in
               (s["prefill_tok_s"], p["prefill_tok_s"])]
        pratio = f"{med(row['prefill_ratio']):.2f}x ({_spread(row['prefill_ratio'], 2)})" if row["prefill_ratio"] else ""
        print(f"| {row['threads']} | {row['quantized_activations']} | {med(bw):.1f} ({_spread(bw)}) | {med(bw) * 1e9 / nbytes:.0f} | {cells[0]} | "
              f"{cells[1]} | {ratio} | {pre[0]} | {pre[1]} | {pratio} |")


if __name__ == "__main__":
    main()
