"""Migration downtime: live migration (pre-copy stages, then a stop-and-copy of the last blocks) against one
stop-and-copy of the whole KV, on a real `strata serve --data-parallel-size 2` (two Ray replicas).

For each prompt length a streaming completion starts; after a few tokens `/admin/migrate` moves it to the other
replica, alternately with `max_stages` 1 (stop-and-copy) and the server's default (live), interleaved so both
see the same machine. Reports per mode the downtime the server measured (from stopping the request at its source
to its first output on the target: `strata:migration_downtime_seconds`), the tokens whose K/V moved during the
stop, and the longest gap between two chunks the client saw after the migration began, next to its median gap.

    .venv/bin/python benchmarks/migration_downtime.py --model MODEL --json docs/benchmarks/migration_downtime.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.servers import free_port, wait_healthy

MAX_TOKENS = 400  # far more than the migration needs: the stream is closed (aborted) once measured
MODES = {"stop-and-copy": 1, "live (pre-copy)": None}  # name -> /admin/migrate max_stages (None: the default)


def serve(model: str | None, flags: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "strata.cli", "serve", "--port", str(port), "--log-level", "warning",
           "--served-model-name", "m", "--data-parallel-size", "2", "--num-threads", "1", *flags,
           *(["--model", model] if model else [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, timeout=600)
    return proc, url


def one_migration(url: str, prompt: list[int], max_stages: int | None, before: int, after: int) -> dict:
    """Stream a completion, migrate it after `before` chunks, read `after` more; -> the server's answer and the
    client's chunk times."""
    import httpx

    times: list[float] = []
    started, moved_back, done = threading.Event(), threading.Event(), threading.Event()
    num_at_move = [0]
    body = {"model": "m", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True}
    error: list[str] = []

    def read():  # until `after` chunks past the migration's answer (closing the stream aborts the request)
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                error.append(f"{r.status_code} {r.read().decode()}")
                started.set()
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    times.append(time.monotonic())
                    if len(times) == before:
                        started.set()
                    if moved_back.is_set() and len(times) >= num_at_move[0] + after:
                        break
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not started.wait(600) or error:
        raise SystemExit(f"the stream produced no tokens {error}")
    t_call = time.monotonic()
    moved = httpx.post(url + "/admin/migrate", json={"max_stages": max_stages} if max_stages else {},
                       timeout=600).json()
    num_at_move[0] = len(times)
    moved_back.set()
    done.wait(600)
    if "downtime_s" not in moved:
        raise SystemExit(f"migration failed: {moved}")
    gaps_before = [b - a for a, b in itertools.pairwise(times[1:before])]
    gaps_after = [b - a for a, b in itertools.pairwise(times) if b > t_call]
    return {**moved, "client_max_gap_s": max(gaps_after), "client_median_gap_s": statistics.median(gaps_before)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder or GGUF file (default: the bundled model)")
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--trials", type=int, default=3, help="migrations per mode and prompt length")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    load_start = os.getloadavg()
    proc, url = serve(args.model, ["--max-model-len", str(max(args.prompt_tokens) + MAX_TOKENS + 64)])
    rows = []
    try:
        import httpx

        text = " ".join(f"word{i % 97} and more text number {i}" for i in range(max(args.prompt_tokens)))
        ids = httpx.post(url + "/tokenize", json={"prompt": text}, timeout=60).json()["tokens"]
        one_migration(url, ids[:64], None, 4, 4)  # warm-up: Ray's first calls, both replicas' paths
        for n in args.prompt_tokens:
            prompt = ids[:n]
            for trial in range(args.trials):
                for mode, stages in MODES.items():
                    r = one_migration(url, prompt, stages, before=8, after=12)
                    rows.append({"prompt_tokens": n, "mode": mode, "trial": trial, **r})
                    print(f"{n:5d} {mode:16s} downtime {1e3 * r['downtime_s']:8.1f} ms  stages {r['stages']}  "
                          f"stopped {r['num_stopped_tokens']:5d}  pre-copied {r['num_precopied_tokens']:5d}  "
                          f"client gap {1e3 * r['client_max_gap_s']:8.1f} ms (median {1e3 * r['client_median_gap_s']:.1f})",
                          flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    load = (load_start, os.getloadavg())
    print(f"\nload average {load[0][0]:.1f} at start, {load[1][0]:.1f} at end")
    print("| prompt tokens | migration | downtime p50 ms | tokens moved while stopped | tokens pre-copied | "
          "client's longest gap p50 ms | client's median gap ms |")
    print("|---|---|---|---|---|---|---|")
    for n in args.prompt_tokens:
        for mode in MODES:
            rs = [r for r in rows if r["prompt_tokens"] == n and r["mode"] == mode]

            def p50(key, rs=rs):
                return statistics.median(r[key] for r in rs)

            print(f"| {n} | {mode} | {1e3 * p50('downtime_s'):.1f} | {p50('num_stopped_tokens'):.0f} | "
                  f"{p50('num_precopied_tokens'):.0f} | {1e3 * p50('client_max_gap_s'):.1f} | "
                  f"{1e3 * p50('client_median_gap_s'):.1f} |")
    if args.json:
        facts = {"cpu_count": os.cpu_count(), "load_average": load, "model": os.path.basename(args.model or "bundled")}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"machine": facts, "rows": rows}, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
