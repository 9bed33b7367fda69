"""Does continuous batching pay on the server? `strata serve` (a subprocess) on the bundled model (or --model),
one stream alone against 16 concurrent streams of 128 tokens each, side by side with the CLI's decode rate
(`LLM.stream`, what `strata generate` runs, in this process) on the same model and threads; a round of each in
turn, `--rounds` times.

Reports output tokens/s in all, TPOT ((last token - first token) / (tokens - 1), mean over streams), the
server's CPU time per output token (all its threads, from /proc: what the tokens/s would follow on cores of its
own) and the ratios the serving aims name: 16 streams' tokens/s over one stream's and one stream's TPOT over the
CLI's, from the median rounds and as the median of each round's own ratio (this machine's speed drifts by up to
1.5x within minutes: a round's ratio compares runs seconds apart); also one stream's server CPU per token over
the CLI's.
Streams are greedy, or sampled with temperature/top-p and a seed per stream (--sampled). The client is aiohttp
(as vLLM's benchmark), on the same machine as the server: its own CPU per token is reported too (httpx took
5-10x as much, 0.2-0.3 ms per token of one stream, as much as a decode step of the bundled model). Results:
docs/benchmarks/serving.md.

    .venv/bin/python benchmarks/serve_batching.py --threads 2 --json docs/benchmarks/serve_batching.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.servers import free_port, wait_healthy

SERVED_NAME = "bench"
PROMPTS = ["ROMEO:", "JULIET:\nO", "First Citizen:\nBefore we proceed", "KING HENRY:", "Where is"]


class CliDecode:
    """The Python API's stream (`LLM.stream`, what `strata generate` runs) in this process, a round at a time, so
    that its rounds alternate with the server's."""

    def __init__(self, threads: int, tokens: int, model: str | None = None, dtype: str = "auto"):
        from strata import LLM, SamplingParams

        self.llm = LLM(model, progress=False, num_threads=threads, dtype=dtype)
        self.params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        for _ in self.llm.stream(PROMPTS[0], self.params):  # warm-up: native kernels built, caches allocated
            pass

    def round(self) -> dict:
        """TPOT as the server rounds take it: first to last text chunk over tokens - 1; CPU per token."""
        c0 = time.process_time()
        stamps = [time.perf_counter() for _ in self.llm.stream(PROMPTS[0], self.params)]
        num = self.llm.last_stats["generated_tokens"]
        return {"tpot_s": (stamps[-1] - stamps[0]) / (num - 1), "cpu_s": (time.process_time() - c0) / num}


def cli_summary(runs: list[dict]) -> dict:
    """CliDecode rounds -> their median TPOT, tokens/s and CPU per token."""
    tpot = statistics.median(r["tpot_s"] for r in runs)
    return {"tpot_ms": tpot * 1e3, "tok_s": 1 / tpot,
            "cpu_ms_per_token": statistics.median(r["cpu_s"] for r in runs) * 1e3,
            "tpot_ms_rounds": [r["tpot_s"] * 1e3 for r in runs]}


def cli_decode(threads: int, tokens: int, rounds: int, model: str | None = None, dtype: str = "auto") -> dict:
    """CliDecode's rounds alone (a fresh interpreter: benchmarks/serve_interleaved.py)."""
    cli = CliDecode(threads, tokens, model, dtype)
    return cli_summary([cli.round() for _ in range(rounds)])


async def _stream(session, base: str, i: int, tokens: int, sampled: bool) -> dict:
    body = {"model": SERVED_NAME, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0.8 if sampled else 0.0, "top_p": 0.95 if sampled else 1.0}
    if sampled:
        body["seed"] = i
    stamps, num = [], 0
    async with session.post(f"{base}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.content:  # one SSE line at a time
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                num = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    return {"tokens": num, "tpot_s": (stamps[-1] - stamps[0]) / max(num - 1, 1)}


def _cpu_s(pid: int) -> float:
    """CPU time (user + system, all threads) of process pid so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _round(base: str, streams: int, tokens: int, sampled: bool, pid: int) -> dict:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        t0, c0, own0 = time.perf_counter(), _cpu_s(pid), time.process_time()
        res = await asyncio.gather(*(_stream(session, base, i, tokens, sampled) for i in range(streams)))
        wall, cpu, own = time.perf_counter() - t0, _cpu_s(pid) - c0, time.process_time() - own0
    total = sum(r["tokens"] for r in res)
    return {"streams": streams, "tokens": total, "wall_s": wall, "tok_s": total / wall,
            "tpot_ms": statistics.mean(r["tpot_s"] for r in res) * 1e3, "server_cpu_ms_per_token": cpu / total * 1e3,
            "client_cpu_ms_per_token": own / total * 1e3}


def serve_rounds(threads: int, tokens: int, rounds: int, sampled: bool, model: str | None = None,
                 dtype: str = "auto", extra_args: tuple[str, ...] = (), cli: CliDecode | None = None) -> dict:

    port = free_port()
    cmd = [sys.executable, "-m", "strata.cli", "serve", *([model] if model else []), "--port", str(port),
           "--num-threads", str(threads), "--max-num-seqs", "16", "--max-model-len", "512", "--dtype", dtype,
           "--served-model-name", SERVED_NAME, "--log-level", "warning", *extra_args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, timeout=120.0)
        asyncio.run(_round(base, 2, 16, sampled, proc.pid))  # warm-up
        runs: dict[int, list[dict]] = {1: [], 16: []}
        cli_runs = []
        # the CLI, one stream and 16 streams in alternation: this machine's speed drifts by up to 1.5x within
        # minutes, and a ratio of two runs far apart would measure the drift; each reports its median round
        for _ in range(rounds):
            if cli is not None:
                cli_runs.append(cli.round())
            for n in (1, 16):
                runs[n].append(asyncio.run(_round(base, n, tokens, sampled, proc.pid)))
        out = {n: {**sorted(rs, key=lambda r: r["tok_s"])[len(rs) // 2], "tok_s_rounds": [r["tok_s"] for r in rs]}
               for n, rs in runs.items()}
        out["pair_ratios"] = [b["tok_s"] / a["tok_s"] for a, b in zip(runs[1], runs[16])]
        if cli_runs:
            out["cli"] = cli_summary(cli_runs)
            out["tpot_ratios"] = [a["tpot_ms"] / (c["tpot_s"] * 1e3) for a, c in zip(runs[1], cli_runs)]
        return out
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=9, help="rounds of each (medians reported)")
    ap.add_argument("--sampled", action="store_true", help="temperature 0.8, top-p 0.95, a seed per stream")
    ap.add_argument("--model", default=None, help="HF folder or GGUF (default: the bundled model)")
    ap.add_argument("--dtype", default="auto", help="strata's --dtype for both the CLI and the server")
    ap.add_argument("--strata-args", default="", help="more `strata serve` flags, e.g. '--stream-interval-ms 5'")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    srv = serve_rounds(args.threads, args.tokens, args.rounds, args.sampled, args.model, args.dtype,
                       tuple(shlex.split(args.strata_args)),
                       CliDecode(args.threads, args.tokens, args.model, args.dtype))
    one, many, cli = srv[1], srv[16], srv["cli"]
    print(f"| run | streams | output tok/s | mean TPOT ms | server CPU ms / token | client CPU ms / token |\n"
          f"|---|---|---|---|---|---|\n"
          f"| CLI decode (LLM.stream) | 1 | {cli['tok_s']:.0f} | {cli['tpot_ms']:.2f} | | |\n"
          f"| strata serve | 1 | {one['tok_s']:.0f} | {one['tpot_ms']:.2f} | {one['server_cpu_ms_per_token']:.3f} | "
          f"{one['client_cpu_ms_per_token']:.3f} |\n"
          f"| strata serve | 16 | {many['tok_s']:.0f} | {many['tpot_ms']:.2f} | {many['server_cpu_ms_per_token']:.3f} | "
          f"{many['client_cpu_ms_per_token']:.3f} |")
    ratios = {"streams16_over_1": many["tok_s"] / one["tok_s"],
              "streams16_over_1_median_pair": statistics.median(srv["pair_ratios"]),
              "server_tpot_over_cli_median_pair": statistics.median(srv["tpot_ratios"]), "server_tpot_over_cli": one["tpot_ms"] / cli["tpot_ms"],
              "cpu_per_token_1_over_16": one["server_cpu_ms_per_token"] / many["server_cpu_ms_per_token"],
              "server_cpu_over_cli_cpu": one["server_cpu_ms_per_token"] / cli["cpu_ms_per_token"]}
    print(f"16 streams / 1 stream: {ratios['streams16_over_1']:.2f}x output tok/s (median of the rounds' own "
          f"ratios {ratios['streams16_over_1_median_pair']:.2f}x), "
          f"{ratios['cpu_per_token_1_over_16']:.2f}x less server CPU per token; "
          f"server TPOT / CLI TPOT (1 stream): {ratios['server_tpot_over_cli']:.2f}x (median of the rounds' own "
          f"{ratios['server_tpot_over_cli_median_pair']:.2f}x); "
          f"CPU per token, server (1 stream) / CLI: {ratios['server_cpu_over_cli_cpu']:.2f}x")
    if args.json:
        from strata.fileio import write_json_atomic

        write_json_atomic(args.json, {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
            "args": vars(args), "cli": cli,
            "serve": {str(k): v for k, v in srv.items() if k in (1, 16)},
            "pair_ratios": srv["pair_ratios"], "tpot_ratios": srv["tpot_ratios"], "ratios": ratios})


if __name__ == "__main__":
    main()
