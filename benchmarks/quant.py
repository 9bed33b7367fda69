"""Issue-4 benchmark: decode (batch 1) and prefill tokens/s of Strata bf16 / int8 / int4-g64 / fp8 against
llama.cpp bf16 / Q8_0 / Q4_0 on GGUFs of the same weights, each with its memory-bandwidth roofline fraction.

    .venv/bin/python benchmarks/quant.py --models dense-1b

Needs llama-cpp-python (benchmarks/peers/install_llamacpp.sh) for the peer columns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
    from strata.config import ModelConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="dense-1b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "quant.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    bw = memory_bandwidth_gbs()
    rows = []
    for name in args.models.split(","):
        base, _, layers = name.rpartition("-")  # "olmoe-1b-7b-2l": the preset cut to 2 layers
        src = synthetic_model(base, int(layers[:-1])) if layers[:-1].isdigit() and layers.endswith("l") else \
            synthetic_model(name)
        cfg = ModelConfig.from_pretrained(src)
        head_params = cfg.vocab_size * cfg.hidden_size
        linear_params = weight_bytes_per_token(cfg, 1.0) - head_params
        for fmt in STRATA_FORMATS:
            path = quantized_folder(Path(src), fmt)
            r = _child("strata", str(path), args.prompt_len, args.decode, args.threads)
            bytes_tok = linear_params * STRATA_BPW[fmt] + head_params * STRATA_HEAD_BPW[fmt]
            rows.append({"model": name, "engine": "strata", "format": fmt, **r, "bytes_per_token": bytes_tok,
                         "roofline_tok_s": bw * 1e9 / bytes_tok})
            print(rows[-1], file=sys.stderr)
        if args.no_peer:
            continue
        from benchmarks.peers.llamacpp import bench_llamacpp, gguf_for

        ids = _prompt(cfg.vocab_size, args.prompt_len)
        for fmt, qtype in PEER_FORMATS.items():
            try:
                r = bench_llamacpp(gguf_for(src, qtype), ids, args.decode, n_threads=args.threads)
                r = {"prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"]}
            except Exception as e:  # noqa: BLE001 - the peer is optional: report why it has no number
                r = {"error": str(e).splitlines()[-1][:200]}
            bytes_tok = linear_params * PEER_BPW[qtype] + head_params * PEER_HEAD_BPW[qtype]
            rows.append({"model": name, "engine": "llama.cpp", "format": qtype, "pairs_with": fmt, **r,
                         "bytes_per_token": bytes_tok, "roofline_tok_s": bw * 1e9 / bytes_tok})
            print(rows[-1], file=sys.stderr)
    machine = {"memory_read_gb_s": bw, "threads": args.threads, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg": os.getloadavg()}
    tmp = args.out + ".tmp"
    Path(tmp).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    os.replace(tmp, args.out)
    print(f"\nmemory read bandwidth {bw:.1f} GB/s, {args.threads} threads, load avg {machine['load_avg'][0]:.1f}\n")
    print("| model | engine | format | prefill tok/s | decode tok/s | roofline tok/s | fraction | vs llama.cpp decode |")
    print("|---|---|---|---|---|---|---|---|")
    peer = {(r["model"], r.get("pairs_with")): r for r in rows if r["engine"] == "llama.cpp" and "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['engine']} | {r['format']} | error: {r['error']} | | | | |")
            continue
        p = peer.get((r["model"], r["format"])) if r["engine"] == "strata" else None
        ratio = f"{r['decode_tok_s'] / p['decode_tok_s']:.2f}x" if p else ""
        print(f"| {r['model']} | {r['engine']} | {r['format']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | "
              f"{r['roofline_tok_s']:.1f} | {r['decode_tok_s'] / r['roofline_tok_s']:.0%} | {ratio} |")


if __name__ == "__main__":
    main()
