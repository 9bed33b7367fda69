"""Before/after on a shared machine: several `strata serve` configurations (a checkout and its flags each) run at
once, and the rounds of benchmarks/serve_batching.py (one stream alone, then 16 concurrent streams) alternate
between them, so a change of the machine's load hits every configuration alike. Prints and writes the median
over rounds of output tokens/s, TPOT and server CPU per token, the 16 / 1 stream ratio, and one stream's TPOT
over the CLI's decode step (this checkout's `LLM.stream`, measured before and after the rounds).

    .venv/bin/python benchmarks/serve_interleaved.py before=../old-checkout after=. \\
        "after-no-interval=.:--stream-interval-ms 0" --rounds 7 --json serve_interleaved.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve_batching import SERVED_NAME, _round
from benchmarks.servers import free_port, wait_healthy


def _parse(spec: str) -> tuple[str, Path, list[str]]:
    """NAME=DIR[:FLAGS] -> (name, checkout, flags)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name:
        raise SystemExit(f"configuration {spec!r}: expected NAME=DIR[:FLAGS]")
    where, _, flags = rest.partition(":")
    code = Path(where).resolve()
    if not (code / "strata").is_dir():
        raise SystemExit(f"configuration {name}: {code} holds no strata package")
    return name, code, shlex.split(flags)


def _cli_tpot_ms(threads: int, tokens: int, model: str | None, dtype: str) -> float:
    """The CLI's decode TPOT (median of 3 in a fresh interpreter, serve_batching.py's CliDecode)."""
    from benchmarks.child import run_child

    res = run_child("benchmarks.serve_batching", "cli_decode", threads, tokens, 3, model, dtype)
    if "error" in res:
        raise SystemExit(f"CLI decode failed: {res['error']}")
    return res["tpot_ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", metavar="NAME=DIR[:FLAGS]", help="a checkout and extra serve flags")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--model", default=None, help="HF folder or GGUF file (default: the bundled model)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--sampled", action="store_true", help="temperature 0.8, top-p 0.95, a seed per stream")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    configs = [_parse(s) for s in args.configs]
    model = str(Path(args.model).resolve()) if args.model and Path(args.model).exists() else args.model
    cli = [_cli_tpot_ms(args.threads, args.tokens, model, args.dtype)]
    servers = {}
    try:
        for name, code, flags in configs:
            port = free_port()
            cmd = [sys.executable, "-m", "strata.cli", "serve", "--port", str(port), "--num-threads",
                   str(args.threads), "--max-num-seqs", "16", "--max-model-len", "512", "--served-model-name",
                   SERVED_NAME, "--log-level", "warning", "--dtype", args.dtype,
                   *(["--model", model] if model else []), *flags]
            proc = subprocess.Popen(cmd, cwd=code, env={**os.environ, "PYTHONPATH": str(code)})
            servers[name] = (proc, f"http://127.0.0.1:{port}")
        for proc, base in servers.values():
            wait_healthy(base, proc, timeout=180.0)
            asyncio.run(_round(base, 2, 16, False, proc.pid))  # warm-up
        load = [os.getloadavg()]
        runs = {name: {1: [], 16: []} for name in servers}
        for _ in range(args.rounds):
            for n in (1, 16):
                for name, (proc, base) in servers.items():
                    runs[name][n].append(asyncio.run(_round(base, n, args.tokens, args.sampled, proc.pid)))
            load.append(os.getloadavg())
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    cli.append(_cli_tpot_ms(args.threads, args.tokens, model, args.dtype))
    cli_tpot = statistics.median(cli)
    keys = ("tok_s", "tpot_ms", "server_cpu_ms_per_token", "client_cpu_ms_per_token")
    out = {name: {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in by_n.items()}
           for name, by_n in runs.items()}
    print(f"load average (1 min) {min(x[0] for x in load):.1f}-{max(x[0] for x in load):.1f}; "
          f"medians of {args.rounds} rounds; CLI decode TPOT {cli_tpot:.3f} ms (runs: "
          f"{', '.join(f'{t:.3f}' for t in cli)})\n"
          "| configuration | 1 stream tok/s (TPOT ms) | 16 streams tok/s (TPOT ms) | 16 / 1 | "
          "server CPU ms / token, 1 / 16 | 1 stream TPOT / CLI |\n|---|---|---|---|---|---|")
    for name, r in out.items():
        print(f"| {name} | {r[1]['tok_s']:.0f} ({r[1]['tpot_ms']:.2f}) | {r[16]['tok_s']:.0f} ({r[16]['tpot_ms']:.1f}) "
              f"| {r[16]['tok_s'] / r[1]['tok_s']:.2f}x | {r[1]['server_cpu_ms_per_token']:.3f} / "
              f"{r[16]['server_cpu_ms_per_token']:.3f} | {r[1]['tpot_ms'] / cli_tpot:.2f}x |")
    if args.json:
        from strata.fileio import write_json_atomic

        write_json_atomic(args.json, {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": load},
            "args": vars(args), "cli_tpot_ms": cli, "medians": out, "rounds": runs})


if __name__ == "__main__":
    main()
