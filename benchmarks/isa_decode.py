"""Decode speed per kernel build: Strata's native kernels as this CPU builds them (AVX-512, or AVX2 through
quant_cpu_avx2.h), the AVX2 build forced where the CPU has AVX-512 too (STRATA_ISA=avx2), and the torch paths
(STRATA_NATIVE=0), side by side with llama.cpp's llama-server on the same GGUF, in alternating rounds.

Strata's figure is the CLI's decode (`LLM.stream`, what `strata generate` runs: greedy, `ignore_eos`) of --tokens
tokens after a short prompt, in a fresh process per configuration and round (the kernel build is chosen once per
process); llama-server's is its own `timings.predicted_per_second` for one /completion request of as many tokens
(a server started once per model, with the same threads). The memory read bandwidth is measured in the same run.

    .venv/bin/python benchmarks/isa_decode.py --threads 1 --rounds 5 --json docs/benchmarks/isa_decode.json \\
        --model bundled=:.cache/peers/gguf/shakespeare-moe-bf16.gguf \\
        --model smollm2=SmolLM2-135M-Instruct.Q4_1.gguf:SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.servers import free_port, wait_healthy

LLAMA_SERVER = ROOT / ".cache" / "peers" / "llama-server-build" / "bin" / "llama-server"
PROMPT = "Once upon a time"


def child(model: str | None, tokens: int, threads: int, dtype: str | None) -> None:
    """(a subprocess) one CLI decode; prints its tok/s and the kernel build as one JSON line"""
    import torch

    from strata.engine.sampling_params import SamplingParams
    from strata.layers import quant_native
    from strata.llm import LLM

    torch.set_num_threads(threads)
    kwargs = {"dtype": dtype} if dtype else {}
    llm = LLM(model, progress=False, **kwargs) if model else LLM(progress=False, **kwargs)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for _ in llm.stream(PROMPT, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)):
        pass  # warm-up: the kernels built and loaded, the first steps run
    t0 = time.perf_counter()
    first = None
    n = 0
    for _ in llm.stream(PROMPT, params):
        n += 1
        if first is None:
            first = time.perf_counter()
    dt = time.perf_counter() - first
    build = quant_native.isa() if quant_native.native_lib() is not None else "torch"
    print(json.dumps({"tok_s": (tokens - 1) / dt, "chunks": n, "build": build, "wall_s": time.perf_counter() - t0}))


def strata_rate(model: str | None, env: dict, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model or "", "--tokens", str(args.tokens),
           "--threads", str(args.threads)] + (["--dtype", args.dtype] if args.dtype else [])
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=1800, cwd=ROOT,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"decode run failed ({env}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_rate(base: str, tokens: int) -> float:
    body = json.dumps({"prompt": PROMPT, "n_predict": tokens, "ignore_eos": True, "temperature": 0.0,
                       "cache_prompt": False}).encode()
    req = urllib.request.Request(base + "/completion", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return float(json.load(r)["timings"]["predicted_per_second"])


def configurations(torch_paths: bool = True) -> dict[str, dict]:
    from strata.layers import quant_native

    isa = quant_native.isa()
    configs = {}
    if isa == "avx512":
        configs["strata AVX-512"] = {"STRATA_ISA": ""}
    if quant_native.AVX2_CPU_FLAGS <= quant_native.cpu_flags():
        configs["strata AVX2"] = {"STRATA_ISA": "avx2"}
    if torch_paths:
        configs["strata torch paths"] = {"STRATA_NATIVE": "0"}
    return configs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=[],
                    help="NAME=STRATA_MODEL:GGUF (STRATA_MODEL empty: the bundled model; GGUF empty: no peer run)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default=None, help="strata's --dtype")
    ap.add_argument("--llama-server", type=Path, default=LLAMA_SERVER)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-torch-paths", action="store_true", help="skip the torch paths (slow on big models)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child or None, args.tokens, args.threads, args.dtype)
        return

    from benchmarks.synthetic import memory_bandwidth_gbs
    from strata.fileio import write_json_atomic
    from strata.layers import quant_native

    models = args.model or ["bundled=:"]
    configs = configurations(not args.no_torch_paths)
    results = []
    for spec in models:
        name, _, paths = spec.partition("=")
        model, _, gguf = paths.partition(":")
        model = os.path.expanduser(model) if model else None
        gguf = os.path.expanduser(gguf) if gguf else None
        runs: dict[str, list[float]] = {c: [] for c in configs}
        server = None
        if gguf and args.llama_server.exists():
            runs["llama-server"] = []
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            server = subprocess.Popen([str(args.llama_server), "-m", gguf, "--port", str(port), "-t", str(args.threads),
                                       "-tb", str(args.threads), "-np", "1", "--no-webui", "--log-disable"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_healthy(base, server)
            llama_rate(base, 8)  # warm-up
        try:
            for r in range(args.rounds):
                for label, env in configs.items():
                    runs[label].append(strata_rate(model, env, args)["tok_s"])
                if server is not None:
                    runs["llama-server"].append(llama_rate(base, args.tokens))
                print(f"{name} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()), flush=True)
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)
        med = {k: statistics.median(v) for k, v in runs.items()}
        results.append({"model": name, "median_tok_s": med, "rounds_tok_s": runs})
    bw = memory_bandwidth_gbs()
    load = os.getloadavg()[0]
    flags = quant_native.cpu_flags()
    cpu = "AVX-512 (BF16)" if quant_native.CPU_FLAGS <= flags else "AVX2 (no AVX-512)"
    print(f"\n{cpu}, {args.threads} thread(s), {args.tokens} tokens, {args.rounds} rounds; memory read {bw:.1f} GB/s, "
          f"load average {load:.2f}\n")
    cols = [c for c in [*configs, "llama-server"] if any(c in r["median_tok_s"] for r in results)]
    print("| model | " + " | ".join(f"{c} tok/s" for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in results:
        print(f"| {r['model']} | " + " | ".join(f"{r['median_tok_s'][c]:.0f}" if c in r["median_tok_s"] else ""
                                               for c in cols) + " |")
    if args.json:
        write_json_atomic(args.json, {"date": datetime.date.today().isoformat(), "cpu": cpu, "threads": args.threads,
                                      "tokens": args.tokens, "rounds": args.rounds, "dtype": args.dtype,
                                      "memory_read_gbs": bw, "load_average": load, "results": results,
                                      "command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
