"""`strata bench serve`: a load generator for any OpenAI-compatible server, in the style of `vllm bench serve`.

Requests arrive as a Poisson process (gamma with --burstiness) at --request-rate, up to --num-prompts or
--duration; each one streams, and the client times every chunk. Prompts come from the ShareGPT sample with
output lengths from the Azure conversation trace, or lengths from the Azure trace, or fixed random lengths.
Reports TTFT, TPOT, inter-token latency and end-to-end latency (mean, p50, p90, p99, ms), request and token
throughput, goodput under --goodput SLOs, and errors; --result-json writes them with the machine's facts.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from strata.errors import ConfigError

# Output lengths ship with the package (CC-BY 4.0, see its README); ShareGPT prompts do not: --dataset-path names
# a ShareGPT JSON file.
AZURE_LENGTHS = Path(__file__).resolve().parents[1] / "assets" / "bench" / "azure_conv_lengths.csv"
WORDS = ["the", "king", "shall", "speak", "of", "love", "and", "war", "tonight", "while", "rivers", "run", "to", "the", "sea", "under", "a", "pale", "moon", "my", "lord", "good", "night", "sweet", "prince", "and", "flights", "of", "angels", "sing", "thee", "to", "thy", "rest"]


@dataclass
class Req:
    prompt: str
    max_tokens: int


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2el: float = 0.0
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0


def _azure() -> list[tuple[int, int]]:
    with open(AZURE_LENGTHS) as f:
        return [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]


def _sharegpt_path(args) -> Path:
    if args.dataset_path:
        path = Path(args.dataset_path)
        if not path.is_file():
            raise ConfigError(f"--dataset-path: {path}: file not found")
        return path
    raise ConfigError("--dataset sharegpt: give the prompts with --dataset-path FILE (ShareGPT JSON); they are "
                      "not shipped in the package (or use --dataset random or azure)")


def load_requests(args, rng: random.Random) -> list[Req]:
    n = args.num_prompts
    if args.dataset == "random":
        return [Req(" ".join(rng.choices(WORDS, k=args.input_len)), args.output_len) for _ in range(n)]
    lengths = _azure()
    if args.dataset == "azure":
        picked = rng.sample(lengths, n) if n <= len(lengths) else rng.choices(lengths, k=n)
        return [Req(" ".join(rng.choices(WORDS, k=max(min(i, args.max_input_len), 1))),
                    max(min(o, args.max_output_len), 1)) for i, o in picked]
    path = _sharegpt_path(args)
    try:
        prompts = [c["conversations"][0]["value"] for c in json.loads(path.read_text())]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise ConfigError(f"--dataset-path: {path}: expected a ShareGPT JSON list of "
                          f"{{'conversations': [{{'value': ...}}]}} ({type(e).__name__}: {e})") from None
    rng.shuffle(prompts)
    out = []
    for i in range(n):
        _, o = rng.choice(lengths)
        out.append(Req(prompts[i % len(prompts)][: args.max_prompt_chars], max(min(o, args.max_output_len), 1)))
    return out


async def one_request(session, args, req: Req) -> Result:
    res = Result()
    body = {"model": args.model, "max_tokens": req.max_tokens, "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    t0 = last = time.perf_counter()
    chunks = 0
    try:
        async with session.post(args.base_url.rstrip("/") + args.endpoint, json=body) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.text(errors='replace'))[:200]}"
                return res
            async for raw in r.content:  # one SSE line at a time
                if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                    continue
                data = json.loads(raw[6:])
                if "error" in data:
                    res.error = data["error"].get("message", "error event")
                    return res
                if data.get("usage"):
                    res.prompt_tokens = data["usage"].get("prompt_tokens", 0)
                    res.output_tokens = data["usage"].get("completion_tokens", 0)
                for c in data.get("choices") or []:
                    text = c.get("text") or (c.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if chunks == 0:
                            res.ttft = now - t0
                        else:
                            res.itls.append(now - last)
                        last, chunks = now, chunks + 1
        res.e2el = time.perf_counter() - t0
        res.output_tokens = res.output_tokens or chunks  # servers without usage in streams: one token per chunk
        res.ok = chunks > 0 or res.output_tokens > 0
        if not res.ok:
            res.error = "empty response"
    except Exception as e:  # noqa: BLE001 - counted as a failed request
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _model_id(session, base: str) -> str:
    """The first model the server lists (GET /v1/models)."""
    import aiohttp

    status = None
    try:
        async with session.get(base.rstrip("/") + "/v1/models") as r:
            status = r.status
            return (await r.json(content_type=None))["data"][0]["id"]
    except aiohttp.ClientConnectionError as e:
        raise ConfigError(f"--base-url {base}: cannot reach the server ({e})") from None
    except (ValueError, KeyError, IndexError, TypeError, aiohttp.ContentTypeError):
        raise ConfigError(f"--base-url {base}: GET /v1/models gave HTTP {status}, not a model list (give "
                          "--model)") from None


async def run_load(args, reqs: list[Req]) -> tuple[list[Result], float]:
    # aiohttp, as vLLM's benchmark client: it shares the machine with the server here, and httpx took 5-10x its
    # CPU per streamed token (0.2-0.3 ms, as much as a small model's decode step)
    import aiohttp

    rng = random.Random(args.seed + 1)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    # a connection per request, as vLLM's client opens a session per request: no cap (the rate decides), and no
    # reuse of a kept-alive connection that the server may be closing as the next request goes out (llama-server
    # did: aiohttp's ServerDisconnectedError, a failure that was the client's)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as session:
        if args.model is None:
            args.model = await _model_id(session, args.base_url)

        async def limited(req):
            if sem is None:
                return await one_request(session, args, req)
            async with sem:
                return await one_request(session, args, req)

        tasks = []
        start = time.perf_counter()
        for req in reqs:
            if args.duration and time.perf_counter() - start > args.duration:
                break
            tasks.append(asyncio.create_task(limited(req)))
            if args.request_rate != float("inf"):
                theta = 1.0 / (args.request_rate * args.burstiness)
                await asyncio.sleep(rng.gammavariate(args.burstiness, theta))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(round(q / 100 * (len(s) - 1)), len(s) - 1)]


def summarize(results: list[Result], duration: float, goodput: dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    series = {"ttft": [r.ttft for r in ok], "e2el": [r.e2el for r in ok],
              "tpot": [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
              "itl": [x for r in ok for x in r.itls]}
    s = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
         "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
         "request_throughput": len(ok) / duration, "output_token_throughput": out_tokens / duration,
         "total_token_throughput": (in_tokens + out_tokens) / duration,
         "errors": sorted({r.error for r in results if not r.ok})[:5]}
    for name, xs in series.items():
        s[f"mean_{name}_ms"] = 1000 * sum(xs) / len(xs) if xs else 0.0
        for q in (50, 90, 99):
            s[f"p{q}_{name}_ms"] = 1000 * _pct(xs, q)
    if goodput:
        def good(r: Result) -> bool:
            tpot = (r.e2el - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
            vals = {"ttft": r.ttft, "tpot": tpot, "e2el": r.e2el}
            return all(1000 * vals[k] <= v for k, v in goodput.items())
        s["request_goodput"] = sum(good(r) for r in ok) / duration
        s["goodput_slo_ms"] = goodput
    return s


def machine_facts() -> dict:
    import numpy as np

    x = np.ones(128 * 2**20 // 8)
    best = min(_timed(x.sum) for _ in range(5))
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
            "memory_read_gbs": round(x.nbytes / best / 1e9, 1)}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def print_table(s: dict, label: str, rate: float) -> None:
    print(f"\n==== {label}  rate={rate} req/s ====")
    print(f"completed {s['completed']}  failed {s['failed']}  duration {s['duration_s']:.1f}s")
    print(f"request throughput {s['request_throughput']:.2f} req/s   output {s['output_token_throughput']:.1f} tok/s   "
          f"total {s['total_token_throughput']:.1f} tok/s" +
          (f"   goodput {s['request_goodput']:.2f} req/s" if "request_goodput" in s else ""))
    print(f"{'ms':>6} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}")
    for m in ("ttft", "tpot", "itl", "e2el"):
        print(f"{m:>6} " + " ".join(f"{s[f'{k}_{m}_ms']:9.1f}" for k in ("mean", "p50", "p90", "p99")))
    for e in s["errors"]:
        print("error:", e)


def _goodput(specs: list[str]) -> dict[str, float]:
    out = {}
    for spec in specs or []:
        k, _, v = spec.partition(":")
        if k not in ("ttft", "tpot", "e2el") or not v:
            raise SystemExit(f"--goodput expects ttft:MS, tpot:MS or e2el:MS, got {spec!r}")
        out[k] = float(v)
    return out


def register(sub) -> None:
    bench = sub.choices.get("bench") if hasattr(sub, "choices") else None
    if bench is None:
        bench = sub.add_parser("bench", help="benchmarks")
        kinds = bench.add_subparsers(dest="bench_command", required=True)
    else:
        kinds = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    p = kinds.add_parser("serve", help="load-test an OpenAI-compatible server (vllm bench serve style)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    p.add_argument("--model", default=None, help="model id to send (default: the server's first /v1/models id)")
    p.add_argument("--api-key", default=os.environ.get("STRATA_API_KEY"))
    p.add_argument("--dataset", choices=("sharegpt", "azure", "random"), default="sharegpt")
    p.add_argument("--dataset-path", default=None,
                   help="ShareGPT-format JSON of prompts (default: the sample beside a development checkout)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, nargs="+", default=[float("inf")], help="req/s; several = sweep")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson, <1 burstier")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--duration", type=float, default=None, help="stop issuing requests after this many seconds")
    p.add_argument("--input-len", type=int, default=128, help="random dataset: prompt words")
    p.add_argument("--output-len", type=int, default=64, help="random dataset: output tokens")
    p.add_argument("--max-input-len", type=int, default=512, help="azure dataset: cap on prompt words")
    p.add_argument("--max-output-len", type=int, default=256, help="cap on requested output tokens")
    p.add_argument("--max-prompt-chars", type=int, default=2000, help="sharegpt: truncate prompts")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--goodput", nargs="*", default=None, help="SLOs like ttft:2000 tpot:200 e2el:20000 (ms)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request client timeout (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="server")
    p.add_argument("--result-json", default=None, help="append one JSON line per rate to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    goodput = _goodput(args.goodput)
    facts = machine_facts()
    for rate in list(args.request_rate):
        args.request_rate = rate
        reqs = load_requests(args, random.Random(args.seed))
        results, duration = asyncio.run(run_load(args, reqs))
        s = summarize(results, duration, goodput)
        print_table(s, args.label, rate)
        if args.result_json:
            config = {k: (str(v) if v == float("inf") else v) for k, v in vars(args).items()
                      if k not in ("func", "api_key")}
            record = {"label": args.label, "request_rate": str(rate), "config": config, "machine": facts, **s}
            with open(args.result_json, "a") as f:
                f.write(json.dumps(record) + "\n")
    return 0
