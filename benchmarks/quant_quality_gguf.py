"""Quality on a real model: Strata's int4 against llama.cpp's quantizer, both from the same bf16 weights.

    .venv/bin/python benchmarks/quant_quality_gguf.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \
        --data ../shared/data/wikitext-2/wiki.test.tokens --bytes 120000

The GGUF's weights are converted to an HF folder (`strata convert gguf`) and cast to bf16: the reference. From
that folder, Strata quantizes the projections with its default method (`strata quantize --format F`), and
llama.cpp's own converter (convert_hf_to_gguf.py, bf16) and quantizer (llama_model_quantize) make Q4_0 and
Q4_K_M GGUFs. With `--mixed FORMATS`, Strata also plans a format per projection among FORMATS
(`strata quantize --mixed`, data-free) within the bytes of llama.cpp's Q4_K_M projections. Every model is
scored by `strata eval ppl` (float32 compute, the same windows: context 512, stride 256) on the first
`--bytes` of the text; the original GGUF is scored too. Bits per weight count the stored bytes of the
transformer blocks' projections (the embedding and output are listed apart).
Results: docs/benchmarks/quant_quality_gguf.json (and the printed table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from strata.fileio import write_json_atomic

STRATA_FORMATS = ["int8", "int4-g64", "int4-g32", "int4-g32-asym"]
LLAMACPP_TYPES = ["q4_0", "q4_k_m"]
_PROJ = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down.")


def _strata(*argv: str) -> str:
    r = subprocess.run([sys.executable, "-m", "strata.cli", *argv], capture_output=True, text=True, check=False,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode:
        raise RuntimeError(f"strata {' '.join(argv)}: {r.stderr.strip().splitlines()[-1:]}")
    return r.stdout


def bf16_folder(gguf: Path, out: Path) -> Path:
    """The GGUF's weights as an HF folder in bf16 (the float32 conversion, cast)."""
    import torch
    from safetensors.torch import load_file, save_file

    if (out / "config.json").exists():
        return out
    f32 = out.with_name(out.name + "-f32")
    if not (f32 / "config.json").exists():
        _strata("convert", "gguf", str(gguf), str(f32))
    out.mkdir(parents=True, exist_ok=True)
    for p in f32.iterdir():
        if p.suffix == ".safetensors":
            save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(p)).items()}, str(out / p.name),
                      metadata={"format": "pt"})
        elif p.name != "config.json":
            (out / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((f32 / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def gguf_bits(path: Path) -> dict:
    """Bits per weight of the block projections, and the types of the embedding / output tensors."""
    from strata.weights.gguf_reader import GGUFFile

    g = GGUFFile(path)
    proj = [t for n, t in g.tensors.items() if n.startswith("blk.") and any(p in n for p in _PROJ)]
    nbytes = sum(int(t.raw.n_bytes) for t in proj)
    params = sum(int(t.raw.n_elements) for t in proj)
    head = {n: g.tensors[n].type_name for n in ("token_embd.weight", "output.weight") if n in g.tensors}
    return {"bits_per_weight": 8 * nbytes / params, "head": head}


def folder_bytes(path: Path) -> int:
    """Stored bytes of the block projections (`*_proj.*` under `.layers.`) of an HF folder."""
    from safetensors import safe_open

    nbytes = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                if ".layers." in k and "_proj." in k:
                    t = h.get_tensor(k)
                    nbytes += t.numel() * t.element_size()
    return nbytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.test.tokens"))
    ap.add_argument("--bytes", type=int, default=120_000)
    ap.add_argument("--formats", default=",".join(STRATA_FORMATS), help="Strata formats to quantize into")
    ap.add_argument("--mixed", default=None, help="candidate formats of a `strata quantize --mixed` row at "
                    "Q4_K_M's bytes per projection weight, e.g. int8,int4-g32")
    ap.add_argument("--jobs", type=int, default=1, help="evaluations run at once (one process each)")
    ap.add_argument("--work", default=None, help="folder for the converted models (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "quant_quality_gguf.json"))
    args = ap.parse_args()
    from benchmarks.peers.llamacpp import quantize_gguf, to_gguf
    from strata.weights.gguf_reader import GGUFFile

    gguf = Path(args.gguf).resolve()
    work = Path(args.work or tempfile.mkdtemp(prefix="quality-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    text = work / "text.txt"
    text.write_bytes(Path(args.data).read_bytes()[: args.bytes])
    ref = bf16_folder(gguf, work / "bf16")
    params = sum(int(t.raw.n_elements) for n, t in GGUFFile(gguf).tensors.items()
                 if n.startswith("blk.") and any(p in n for p in _PROJ))
    models = [("bf16 (reference)", "strata", ref, 16.0, "bf16")]
    b = gguf_bits(gguf)
    models.append((f"original GGUF ({gguf.name})", "llama.cpp", gguf, b["bits_per_weight"], b["head"]))
    for fmt in args.formats.split(","):
        out = work / f"strata-{fmt}"
        if not (out / "config.json").exists():
            _strata("quantize", "--format", fmt, str(ref), str(out))
        models.append((f"Strata {fmt} (default method)", "strata", out, 8 * folder_bytes(out) / params,
                       "bf16 (tied)"))
    bf16_gguf = to_gguf(ref, work / "bf16.gguf", "bf16")
    for qtype in LLAMACPP_TYPES:
        out = quantize_gguf(bf16_gguf, work / f"llamacpp-{qtype}.gguf", qtype)
        b = gguf_bits(out)
        models.append((f"llama.cpp {qtype.upper()}", "llama.cpp", out, b["bits_per_weight"], b["head"]))
    if args.mixed:
        from strata.weights.quantize_checkpoint import scan

        kbits = gguf_bits(work / "llamacpp-q4_k_m.gguf")["bits_per_weight"]
        budget = scan(ref)[1] + int(params * kbits / 8)  # everything but the projections stays as it is
        out = work / "strata-mixed"
        if not (out / "config.json").exists():
            _strata("quantize", "--mixed", "--format", args.mixed, "--budget", str(budget), "--no-progress",
                    str(ref), str(out))
        models.insert(len(models) - len(LLAMACPP_TYPES), (
            f"Strata --mixed {args.mixed} at Q4_K_M's bytes (default method)", "strata", out,
            8 * folder_bytes(out) / params, "bf16 (tied)"))

    def score(model: tuple) -> dict:
        label, maker, path, bits, head = model
        t = time.time()
        res = json.loads(_strata("eval", "ppl", "--model", str(path), "--data", str(text), "--context", "512",
                                 "--json").strip().splitlines()[-1])
        row = {"model": label, "made_by": maker, "bits_per_weight": bits, "embedding_output": head, **res,
               "eval_s": time.time() - t}
        print(row, file=sys.stderr)
        return row

    with ThreadPoolExecutor(args.jobs) as pool:  # each evaluation is its own process
        rows = list(pool.map(score, models))
    ref_ppl = rows[0]["ppl"]
    write_json_atomic(args.out, {"date": time.strftime("%Y-%m-%d %H:%M"), "gguf": gguf.name,
                                 "text_bytes": args.bytes, "context": 512, "stride": 256, "rows": rows})
    print(f"\nperplexity on the first {args.bytes} bytes of {Path(args.data).name}, context 512, stride 256, "
          f"float32 compute ({rows[0]['tokens']} tokens)\n")
    print("| model | bits/weight (block projections) | embedding / output | perplexity | vs bf16 |")
    print("|---|---|---|---|---|")
    for r in rows:
        head = r["embedding_output"] if isinstance(r["embedding_output"], str) else ", ".join(
            f"{k.split('.')[0]} {v}" for k, v in r["embedding_output"].items())
        print(f"| {r['model']} | {r['bits_per_weight']:.2f} | {head} | {r['ppl']:.2f} | "
              f"{(r['ppl'] / ref_ppl - 1) * 100:+.1f}% |")


if __name__ == "__main__":
    main()
