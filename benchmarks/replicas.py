"""Replicas behind one endpoint: the Azure conversation trace's lengths replayed by `strata bench serve` at
rising request rates against one engine (`strata serve`, 1 and 2 threads), two Ray replicas of one thread
each (`--data-parallel-size 2`) and the same two as one prefill and one decode replica
(`--pd-disaggregation`), and two with load-balancing migration (`--enable-migration`), all on the bundled
model, side by side in one run (`--servers` picks some). Each server first serves a few warm-up requests that
are not measured.

Reports p50/p99 TTFT, p50 TPOT and output tokens/s per rate, and the throughput ratio of two replicas to one
engine of one thread (what each replica gets) and of two threads (the same cores as two replicas).

    .venv/bin/python benchmarks/replicas.py --json docs/benchmarks/replicas.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.servers import free_port

SERVERS = {  # name -> serve flags
    "1 engine x 1 thread": ["--num-threads", "1"],
    "1 engine x 2 threads": ["--num-threads", "2"],
    "2 replicas x 1 thread": ["--num-threads", "1", "--data-parallel-size", "2"],
    "2 replicas, prefill + decode": ["--num-threads", "1", "--data-parallel-size", "2", "--pd-disaggregation"],
    "2 replicas + migration": ["--num-threads", "1", "--data-parallel-size", "2", "--enable-migration"],
}


def serve(flags: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx


    port = free_port()
    cmd = [sys.executable, "-m", "strata.cli", "serve", "--port", str(port), "--log-level", "warning",
           "--served-model-name", "bundled", "--max-num-seqs", "16", *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server {flags} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server {flags} did not start")


def bench(url: str, rates: list[float], num_prompts: int, label: str) -> list[dict]:
    def run(rates, num, out):
        cmd = [sys.executable, "-m", "strata.cli", "bench", "serve", "--base-url", url, "--dataset", "azure",
               "--num-prompts", str(num), "--max-input-len", "256", "--max-output-len", "64",
               "--ignore-eos", "--seed", "0", "--label", label, "--result-json", out,
               "--request-rate", *map(str, rates)]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)

    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as warm, \
            tempfile.NamedTemporaryFile("r", suffix=".jsonl") as out:
        run([1.0], 4, warm.name)  # every replica has served once: first-call costs are not measured
        run(rates, num_prompts, out.name)
        return [json.loads(line) for line in out.read().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    ap.add_argument("--num-prompts", type=int, default=30)
    ap.add_argument("--servers", nargs="+", choices=list(SERVERS), default=list(SERVERS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results: dict[str, list[dict]] = {}
    migrations: dict[str, float] = {}
    for name in args.servers:
        proc, url = serve(SERVERS[name])
        try:
            results[name] = bench(url, args.rates, args.num_prompts, name)
            import httpx

            metrics = httpx.get(url + "/metrics", timeout=10).text
            migrations[name] = sum(float(line.split()[-1]) for line in metrics.splitlines()
                                   if line.startswith("strata:migrations_total"))
        finally:
            proc.terminate()
            proc.wait(60)
    print("| server | req/s offered | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | output tok/s | failed |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        for r in rows:
            print(f"| {name} | {r['request_rate']} | {r['p50_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} | "
                  f"{r['p50_tpot_ms']:.1f} | {r['output_token_throughput']:.1f} | {r['failed']} |")
    print("migrations (warm-up included):", {k: v for k, v in migrations.items() if "replicas" in k})
    for two in ("2 replicas x 1 thread", "2 replicas, prefill + decode", "2 replicas + migration"):
        for base in ("1 engine x 1 thread", "1 engine x 2 threads", "2 replicas x 1 thread"):
            if two == base or two not in results or base not in results:
                continue
            ratios = [f"{t['output_token_throughput'] / b['output_token_throughput']:.2f}"
                      for t, b in zip(results[two], results[base], strict=True)]
            print(f"output tok/s, {two} / {base}, per rate: {', '.join(ratios)}")
    if args.json:
        facts = {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "date": time.strftime("%Y-%m-%d"),
                 "args": vars(args)}
        Path(args.json).write_text(json.dumps({"facts": facts, "results": results, "migrations": migrations},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
