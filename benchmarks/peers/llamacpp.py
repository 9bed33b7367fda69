"""llama.cpp (through llama-cpp-python) as the side-by-side peer: HF -> GGUF conversion, quantization, and
prefill/decode timing, each in its own subprocess so the peer never shares memory with the caller.

    benchmarks/peers/install_llamacpp.sh                         # once: build with AMX off, unpack the sdist
    .venv/bin/python benchmarks/peers/llamacpp.py gguf .cache/bench/dense-1b --type q4_0
    .venv/bin/python benchmarks/peers/llamacpp.py bench .cache/peers/gguf/dense-1b-q4_0.gguf --threads 2

GGUFs are cached as .cache/peers/gguf/<hf folder name>-<type>.gguf. bf16/f16/q8_0 come from the vendored
convert_hf_to_gguf.py; other types (q4_0, q4_k_m, ...) from llama_model_quantize on the bf16 file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.peers.hf_folder import PEERS, vendor_dir, with_tokenizer

GGUF_CACHE = PEERS / "gguf"
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
# Used when the converter does not recognise the pre-tokenizer hash of a tokenizer we synthesised; "gpt-2" is
# the plain byte-level regex that pre_tokenizers.ByteLevel applies. Token-id benchmarks do not depend on it.
FALLBACK_PRE = "gpt-2"


class PeerError(RuntimeError):
    """A peer step (conversion, quantization, run) failed; the message carries the tail of its stderr."""


def _child(fn: str, timeout: float | None = None, env: dict[str, str] | None = None, **kwargs) -> dict:
    """Runs `_child_<fn>(**kwargs)` of this module in a fresh interpreter and returns its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", fn, json.dumps(kwargs)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env or {}))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
    raise PeerError(f"{fn} failed (rc {r.returncode}):\n{tail}")


def _fresh(out: Path, src: Path) -> bool:
    return out.exists() and out.stat().st_mtime >= src.stat().st_mtime


def to_gguf(hf_folder: str | Path, out_path: str | Path | None = None, outtype: str = "bf16") -> Path:
    """HF checkpoint folder -> GGUF via the vendored converter (cached; a tokenizer is added if missing)."""
    if outtype not in CONVERTER_TYPES:
        raise ValueError(f"outtype {outtype!r}: the converter writes {CONVERTER_TYPES}; use quantize_gguf for others")
    src = Path(hf_folder).resolve()
    out = Path(out_path) if out_path else GGUF_CACHE / f"{src.name}-{outtype}.gguf"
    if _fresh(out, src / "config.json"):
        return out
    folder = with_tokenizer(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    _child("convert", argv=[str(folder), "--outfile", str(tmp), "--outtype", outtype])
    os.replace(tmp, out)
    return out


def quantize_gguf(in_path: str | Path, out_path: str | Path, qtype: str = "q4_0", n_threads: int = 2) -> Path:
    """GGUF -> GGUF of `qtype` (any LLAMA_FTYPE_MOSTLY_<QTYPE> name, e.g. q4_0, q8_0, q4_k_m)."""
    out = Path(out_path)
    if _fresh(out, Path(in_path)):
        return out
    tmp = out.with_name(f".{out.name}.tmp")
    _child("quantize", src=str(in_path), dst=str(tmp), qtype=qtype, n_threads=n_threads)
    os.replace(tmp, out)
    return out


def gguf_for(hf_folder: str | Path, qtype: str = "bf16") -> Path:
    """The cached GGUF of `hf_folder` in `qtype`, converting/quantizing as needed."""
    if qtype in CONVERTER_TYPES:
        return to_gguf(hf_folder, outtype=qtype)
    bf16 = to_gguf(hf_folder, outtype="bf16")
    return quantize_gguf(bf16, GGUF_CACHE / f"{Path(hf_folder).resolve().name}-{qtype}.gguf", qtype)


def bench_llamacpp(gguf_path: str | Path, prompt_ids: list[int], n_decode: int, n_threads: int = 2,
                   n_ctx: int | None = None, use_mmap: bool = True, warmup: bool = True,
                   env: dict[str, str] | None = None, repack: bool = True) -> dict:
    """Prefill `prompt_ids`, then `n_decode` greedy single-token steps, timed separately (subprocess).

    Returns {"prefill_tok_s", "decode_tok_s", "load_s", "tokens", "decode_read_bytes", "llama_perf"}:
    decode_read_bytes is what the decode steps read from storage (page faults of the mmap); prefill_tok_s is
    len(prompt)/time of the prompt's eval; decode_tok_s is n_decode/time of the n_decode single-token evals
    that follow (logits read + argmax included, prompt excluded); tokens are the n_decode + 1 greedy ids.
    llama_perf is llama.cpp's own counters for the same run (cross-check). `env` is added to the child's
    environment, e.g. {"OMP_WAIT_POLICY": "passive"} (see docs/benchmarks/peers.md: on a CPU shared with
    other processes, 2 spinning OpenMP threads lose 5-10x).
    """
    n_ctx = n_ctx or len(prompt_ids) + n_decode + 16
    return _child("bench", env=env, gguf_path=str(gguf_path), prompt_ids=list(map(int, prompt_ids)), n_decode=n_decode,
                  n_threads=n_threads, n_ctx=n_ctx, use_mmap=use_mmap, warmup=warmup, repack=repack)


def greedy_llamacpp(gguf_path: str | Path, prompt_ids: list[int], n_tokens: int, n_threads: int = 2) -> dict:
    """{"tokens": n_tokens greedy ids, "logits": float32 logits after the prompt} (subprocess)."""
    return _child("greedy", gguf_path=str(gguf_path), prompt_ids=list(map(int, prompt_ids)), n_tokens=n_tokens,
                  n_threads=n_threads)


def gguf_vocab_size(gguf_path: str | Path) -> int:
    """Number of tokens in a GGUF's vocabulary (vocab-only load; gguf-py's reader takes minutes on BPE merges)."""
    return _child("vocab_size", gguf_path=str(gguf_path))["n_vocab"]


def server_command(gguf_path: str | Path, port: int = 8001, n_threads: int = 2, n_ctx: int = 2048,
                   host: str = "127.0.0.1") -> list[str]:
    """argv for llama-cpp-python's OpenAI-compatible server; start it with subprocess.Popen."""
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--host", host, "--port",
            str(port), "--n_threads", str(n_threads), "--n_threads_batch", str(n_threads), "--n_ctx", str(n_ctx)]


# ---- child side: runs in the subprocess ------------------------------------------------------------------

def _child_convert(argv: list[str]) -> dict:
    """Runs the vendored converter, falling back to FALLBACK_PRE for unknown pre-tokenizer hashes."""
    import logging
    import runpy

    vendor = vendor_dir()
    sys.path[:0] = [str(vendor), str(vendor / "gguf-py")]
    from conversion import base

    recognised = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return recognised(self, tokenizer)
        except NotImplementedError:
            logging.getLogger("strata-peer").warning("pre-tokenizer not recognised; using %r", FALLBACK_PRE)
            return FALLBACK_PRE

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(vendor / "convert_hf_to_gguf.py"), *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")
    return {"ok": True}


def _child_quantize(src: str, dst: str, qtype: str, n_threads: int) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.nthread = n_threads
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise PeerError(f"llama_model_quantize({src} -> {qtype}) returned {rc}")
    return {"ok": True}


def _child_vocab_size(gguf_path: str) -> dict:
    import llama_cpp

    return {"n_vocab": llama_cpp.Llama(model_path=gguf_path, vocab_only=True, verbose=False).n_vocab()}


def _load(gguf_path: str, n_ctx: int, n_threads: int, use_mmap: bool = True, repack: bool = True):
    """repack=False: no CPU "extra buffer types" (use_extra_bufts), whose repacking copies Q4_0/Q4_K weights out
    of the mapping into anonymous memory; the weights are then used where the file is mapped."""
    import llama_cpp

    if not repack:  # Llama() takes its model params from the low-level module's defaults
        import llama_cpp.llama_cpp as low

        defaults = low.llama_model_default_params

        def no_extra_bufts():
            p = defaults()
            p.use_extra_bufts = False
            return p

        low.llama_model_default_params = no_extra_bufts

    return llama_cpp.Llama(model_path=gguf_path, n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=n_threads,
                           n_threads_batch=n_threads, use_mmap=use_mmap, verbose=False)


def _last_logits(llm):
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))  # [V] float32


def _read_bytes() -> int:
    """Bytes this process caused to be read from storage (/proc/self/io; mmap page faults count; 0 elsewhere)."""
    try:
        with open("/proc/self/io") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("read_bytes:"))
    except (OSError, StopIteration):
        return 0


def _child_bench(gguf_path: str, prompt_ids: list[int], n_decode: int, n_threads: int, n_ctx: int,
                 use_mmap: bool, warmup: bool, repack: bool = True) -> dict:
    import llama_cpp

    t = time.perf_counter()
    llm = _load(gguf_path, n_ctx, n_threads, use_mmap, repack)
    load_s = time.perf_counter() - t
    if warmup:  # touches every dense weight page once, so the prefill below is not a page-fault benchmark
        llm.eval(prompt_ids[:8])
        llm.eval([int(_last_logits(llm).argmax())])
        llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    t1 = time.perf_counter()
    tokens = [int(_last_logits(llm).argmax())]
    r1 = _read_bytes()
    for _ in range(n_decode):
        llm.eval([tokens[-1]])
        tokens.append(int(_last_logits(llm).argmax()))
    t2 = time.perf_counter()
    perf = llama_cpp.llama_perf_context(llm.ctx)
    return {"prefill_tok_s": len(prompt_ids) / (t1 - t0), "decode_tok_s": n_decode / (t2 - t1),
            "load_s": load_s, "tokens": tokens, "decode_read_bytes": _read_bytes() - r1,
            "llama_perf": {"prompt_ms": perf.t_p_eval_ms, "n_prompt": perf.n_p_eval, "eval_ms": perf.t_eval_ms,
                           "n_eval": perf.n_eval}}


def _child_greedy(gguf_path: str, prompt_ids: list[int], n_tokens: int, n_threads: int) -> dict:
    llm = _load(gguf_path, len(prompt_ids) + n_tokens + 8, n_threads)
    llm.eval(prompt_ids)
    logits = _last_logits(llm).tolist()
    tokens = [int(_last_logits(llm).argmax())]
    while len(tokens) < n_tokens:
        llm.eval([tokens[-1]])
        tokens.append(int(_last_logits(llm).argmax()))
    return {"tokens": tokens, "logits": logits}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        result = globals()[f"_child_{argv[1]}"](**json.loads(argv[2]))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gguf", help="convert (and quantize) an HF folder; prints the GGUF path")
    g.add_argument("hf_folder")
    g.add_argument("--type", default="bf16", help="bf16, f16, q8_0 (converter) or q4_0, q4_k_m, ... (quantize)")
    b = sub.add_parser("bench", help="prefill/decode tok/s of a GGUF on a random token-id prompt")
    b.add_argument("gguf")
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--decode", type=int, default=32)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--no-mmap", action="store_true")
    b.add_argument("--omp-passive", action="store_true", help="OMP_WAIT_POLICY=passive for the peer")
    args = ap.parse_args(argv)
    if args.cmd == "gguf":
        print(gguf_for(args.hf_folder, args.type))
    else:
        import random

        prompt = [random.Random(0).randrange(3, min(gguf_vocab_size(args.gguf), 30000)) for _ in range(args.prompt_len)]
        r = bench_llamacpp(args.gguf, prompt, args.decode, args.threads, use_mmap=not args.no_mmap,
                           env={"OMP_WAIT_POLICY": "passive"} if args.omp_passive else None)
        print(json.dumps({k: v for k, v in r.items() if k != "tokens"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
