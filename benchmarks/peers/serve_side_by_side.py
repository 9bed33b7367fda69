"""`strata serve` and llama.cpp's `llama-server` side by side under the same load from `strata bench serve`.

Each server runs alone in turn on the same model (Strata on the GGUF or HF folder, llama-server on a GGUF of the
same weights), the same compute threads and the same number of sequences (llama-server `-np` slots with
continuous batching `-cb`, Strata `--max-num-seqs`); then `strata bench serve` sends both the same requests
(ShareGPT prompts, Azure conversation output lengths, Poisson arrivals at each --request-rate) and appends one
JSON line per server and rate to --result-json (the command and the date ride along in each line's config).
Every rate sends the same prompts, and both servers keep prompts in a prefix cache (Strata by KV block,
llama-server per slot), so a later rate on the same server finds earlier prompts cached; --server-per-rate
starts fresh servers for each rate, taking turns.
Build llama-server first with benchmarks/peers/install_llama_server.sh. Plot with benchmarks/peers/serve_plot.py.

    .venv/bin/python benchmarks/peers/serve_side_by_side.py --model ~/.cache/strata/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --gguf ~/.cache/strata/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --name smollm2 --threads 1 \\
        --max-num-seqs 16 --request-rate 1 4 16 inf --num-prompts 48 --result-json docs/benchmarks/serving.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.servers import free_port, wait_healthy

# the ShareGPT sample of the shared data folder beside the checkout (not in the repository)
SHAREGPT = ROOT.parent / "shared" / "data" / "sharegpt-prompts-500" / "ShareGPT_V3_filtered_500.json"
LLAMA_SERVER = ROOT / ".cache" / "peers" / "llama-server-build" / "bin" / "llama-server"


def server_commands(args, port: int) -> dict[str, list[str]]:
    strata = [sys.executable, "-m", "strata.cli", "serve", *([args.model] if args.model else []), "--port", str(port),
              "--served-model-name", args.name, "--num-threads", str(args.threads), "--max-num-seqs",
              str(args.max_num_seqs), "--max-model-len", str(args.max_model_len), "--log-level", "warning",
              *shlex.split(args.strata_args)]
    llama = [str(args.llama_server), "-m", str(args.gguf), "--port", str(port), "--alias", args.name,
             "-t", str(args.threads), "-tb", str(args.threads), "-np", str(args.max_num_seqs), "-cb",
             "-c", str(args.max_model_len * args.max_num_seqs), "--no-webui", "--log-disable"]
    return {"strata": strata, "llama-server": llama}


def bench(args, base: str, label: str, rates: list[float]) -> None:
    cmd = [sys.executable, "-m", "strata.cli", "bench", "serve", "--base-url", base, "--model", args.name,
           "--dataset", "sharegpt", "--dataset-path", os.path.relpath(args.dataset_path, ROOT), "--num-prompts", str(args.num_prompts), "--request-rate",
           *map(str, rates), "--max-output-len", str(args.max_output_len), "--max-prompt-chars",
           str(args.max_prompt_chars), "--label", label, "--seed", str(args.seed)]
    if args.result_json:
        cmd += ["--result-json", args.result_json]
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="strata serve's model (default: the bundled one)")
    ap.add_argument("--gguf", required=True, help="llama-server's GGUF of the same weights")
    ap.add_argument("--name", required=True, help="served model name, and the label prefix")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=1024, help="per sequence (llama-server: -c this x -np)")
    ap.add_argument("--request-rate", type=float, nargs="+", default=[1.0, 4.0, float("inf")])
    ap.add_argument("--dataset-path", default=str(SHAREGPT), help="ShareGPT JSON prompts")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--max-output-len", type=int, default=128)
    ap.add_argument("--max-prompt-chars", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--servers", nargs="+", default=["strata", "llama-server"], choices=["strata", "llama-server"])
    ap.add_argument("--strata-args", default="", help="more `strata serve` flags, e.g. '--dtype bfloat16'")
    ap.add_argument("--llama-server", type=Path, default=LLAMA_SERVER)
    ap.add_argument("--result-json", default=None, help="append one JSON line per server and rate")
    ap.add_argument("--server-per-rate", action="store_true",
                    help="a fresh server for each rate (no prompts cached by an earlier rate)")
    args = ap.parse_args()
    if "llama-server" in args.servers and not args.llama_server.is_file():
        raise SystemExit(f"{args.llama_server}: not built (run benchmarks/peers/install_llama_server.sh)")
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load average "
          f"{os.getloadavg()[0]:.1f}: {shlex.join(sys.argv)}", flush=True)
    # per rate, the servers take turns, so the two halves of a row run minutes apart at most
    rate_groups = [[r] for r in args.request_rate] if args.server_per_rate else [args.request_rate]
    for rates in rate_groups:
        for server in args.servers:
            run_server(args, server, rates)


def run_server(args, server: str, rates: list[float]) -> None:
    """Starts `server`, drives it at `rates` one after another, stops it."""
    port = free_port()
    cmd = server_commands(args, port)[server]
    print("#", shlex.join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, proc, timeout=900.0)
        bench(args, base, f"{args.name}/{server}", rates)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
