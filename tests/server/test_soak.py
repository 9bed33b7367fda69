"""Soak test: a real `strata serve` under minutes of mixed concurrent load (slow; off the default run).

    pytest -m slow -s tests/server/test_soak.py          # STRATA_SOAK_SECONDS=120 by default

Concurrent asyncio clients send completions, chats, streams read to the end or dropped mid-way, long prompts
near `max_model_len`, `n` > 1, `response_format` json_object and stop strings to a server with a small
waiting queue, so many requests get 429 and retry after the `Retry-After` header. Asserted: no request lost
(every request ends in a complete 2xx, possibly after 429 retries; a 5xx, a timeout, another 4xx or a
connection error the client did not cause counts as lost), the running/waiting gauges and the KV-cache usage
back to 0 afterwards, and the server's RSS bounded (see `rss_bound`).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time

import httpx
import pytest

from tests.server.conftest import Server

pytestmark = pytest.mark.slow

SOAK_SECONDS = float(os.environ.get("STRATA_SOAK_SECONDS", "120"))
NUM_CLIENTS = 12  # against 4 running sequences and a waiting queue of 2: most bursts meet a 429
REQUEST_TIMEOUT = 120.0  # a client without an answer this long counts the request as lost
MAX_ATTEMPTS = 200  # 429 retries of one request before it counts as lost
RSS_GROWTH = 1.10  # RSS after the warm-up may exceed the warm-up peak by at most 10 %
WORDS = ["thou", "art", "the", "sun", "and", "I", "the", "moon", "that", "follows", "thee", "through", "night",
         "and", "day"]


class Tally:
    def __init__(self):
        self.counts = {k: 0 for k in ("tried", "completed", "retried_429", "disconnects", "5xx", "other_4xx",
                                      "timeouts", "conn_errors", "incomplete", "lost")}
        self.failures: list[str] = []

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def lose(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        self.counts["lost"] += 1
        if len(self.failures) < 20:
            self.failures.append(f"{kind}: {detail}")


def prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_request(rng: random.Random, long_prompt: str, long_tokens: int, max_len: int) -> tuple[str, str, dict]:
    """One request of a random kind: (kind, path, body)."""
    kind = rng.choice(["completion", "chat", "stream", "disconnect", "disconnect", "long", "n", "json", "stop"])
    temp = rng.choice([0, 0.7, 1.0])
    if kind == "completion":
        return kind, "/v1/completions", {"prompt": prompt(rng, rng.randint(2, 40)), "max_tokens": rng.randint(1, 32),
                                         "temperature": temp}
    if kind == "chat":
        msgs = [{"role": "user", "content": prompt(rng, rng.randint(2, 30))}]
        return kind, "/v1/chat/completions", {"messages": msgs, "max_tokens": rng.randint(1, 32), "temperature": temp}
    if kind in ("stream", "disconnect"):
        return kind, "/v1/completions", {"prompt": prompt(rng, 8), "max_tokens": 48, "temperature": temp,
                                         "stream": True}
    if kind == "long":  # the prompt plus max_tokens just at max_model_len
        return kind, "/v1/completions", {"prompt": long_prompt, "max_tokens": max_len - long_tokens,
                                         "temperature": temp, "ignore_eos": True}
    if kind == "n":
        return kind, "/v1/completions", {"prompt": prompt(rng, 6), "max_tokens": 12, "n": 3, "temperature": 1.0}
    if kind == "json":
        msgs = [{"role": "user", "content": "answer in JSON: " + prompt(rng, 6)}]
        return kind, "/v1/chat/completions", {"messages": msgs, "max_tokens": 96, "temperature": temp,
                                              "response_format": {"type": "json_object"}}
    return kind, "/v1/completions", {"prompt": prompt(rng, 6), "max_tokens": 32, "temperature": 1.0,
                                     "stop": ["e", "\n"]}


def check_body(kind: str, body: dict, data: dict) -> str | None:
    """None when the 2xx response is complete for its request, else what is wrong."""
    choices = data.get("choices") or []
    want = body.get("n", 1)
    if len(choices) != want or any(c.get("finish_reason") not in ("stop", "length") for c in choices):
        return f"{kind}: {len(choices)} choices of {want}, finish {[c.get('finish_reason') for c in choices]}"
    texts = [c["message"]["content"] if "message" in c else c["text"] for c in choices]
    usage = data.get("usage") or {}
    if kind == "long" and usage.get("completion_tokens") != body["max_tokens"]:
        return f"long: {usage.get('completion_tokens')} tokens of {body['max_tokens']} (ignore_eos)"
    if kind == "stop" and any(s in t for t in texts for s in body["stop"]):
        return f"stop: a stop string left in {texts!r}"
    if kind == "json" and choices[0]["finish_reason"] == "stop":
        try:
            json.loads(texts[0])
        except ValueError:
            return f"json: not JSON after finish 'stop': {texts[0]!r}"
    return None


async def send(client: httpx.AsyncClient, rng: random.Random, kind: str, path: str, body: dict,
               tally: Tally) -> None:
    """One request to its end: retried after each 429 as Retry-After says; tallies how it ended."""
    tally.add("tried")
    for _ in range(MAX_ATTEMPTS):
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                if body.get("stream"):
                    status, retry_after, outcome = await stream(client, rng, kind, path, body)
                else:
                    r = await client.post(path, json=body)
                    status, retry_after = r.status_code, r.headers.get("retry-after")
                    outcome = check_body(kind, body, r.json()) if status == 200 else r.text[:200]
        except TimeoutError:
            return tally.lose("timeouts", f"{kind} after {REQUEST_TIMEOUT} s")
        except httpx.TransportError as e:
            return tally.lose("conn_errors", f"{kind}: {type(e).__name__} {e}")
        if status == 429:
            tally.add("retried_429")
            assert retry_after is not None, "429 without Retry-After"
            await asyncio.sleep(float(retry_after) * rng.uniform(0.2, 1.0))  # jitter below the hint
            continue
        if status >= 500:
            return tally.lose("5xx", f"{kind} {status}: {outcome}")
        if status != 200:
            return tally.lose("other_4xx", f"{kind} {status}: {outcome}")
        if outcome == "disconnected":
            return tally.add("disconnects")
        if outcome is not None:
            return tally.lose("incomplete", outcome)
        return tally.add("completed")
    tally.lose("timeouts", f"{kind}: still 429 after {MAX_ATTEMPTS} attempts")


async def stream(client, rng, kind, path, body):
    """(status, Retry-After, None | 'disconnected' | what was wrong) of one SSE request."""
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, r.headers.get("retry-after"), r.text[:200]
        drop_after = rng.randint(1, 6) if kind == "disconnect" else None
        events, done, finish = 0, False, None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return 200, None, f"stream error event: {chunk['error']}"
            finish = chunk["choices"][0].get("finish_reason") or finish
            events += 1
            if drop_after is not None and events >= drop_after:
                return 200, None, "disconnected"  # leaving the block closes the connection mid-stream
        if not done or finish not in ("stop", "length"):
            return 200, None, f"stream ended without [DONE] (done={done}, finish={finish}, {events} events)"
        return 200, None, None


async def client_loop(url: str, seed: int, stop_at: float, tally: Tally, long_prompt: str, long_tokens: int,
                      max_len: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT) as client:
        while time.monotonic() < stop_at:
            kind, path, body = make_request(rng, long_prompt, long_tokens, max_len)
            await send(client, rng, kind, path, body, tally)


def sample_rss(pid: int, samples: list[tuple[float, int, int]], tally: Tally, stop: threading.Event) -> None:
    """Appends (seconds, requests ended so far, RSS bytes) four times a second."""
    import psutil

    proc, t0 = psutil.Process(pid), time.monotonic()
    while not stop.is_set():
        try:
            ended = tally.counts["completed"] + tally.counts["disconnects"] + tally.counts["lost"]
            samples.append((time.monotonic() - t0, ended, proc.memory_info().rss))
        except psutil.Error:
            return
        stop.wait(0.25)


def rss_bound(samples: list[tuple[float, int, int]]) -> tuple[int, int]:
    """(peak over the warm-up, peak after it). Measured (bundled model, 4-13 requests/s): RSS climbs from about
    350 MiB by ~350 MiB over the first 40 s (not broken down: caches, compiled grammars, the malloc arenas of
    the server's threads growing to their working size), then in ever smaller steps (+11 MiB, 1.4 %, over the
    second half of a 4-minute run; +4 MiB in its last minute). The warm-up is the first half of the requests
    (counted, not timed: on a loaded machine the server serves fewer per second), hundreds of each kind at
    the default duration; past it, a leak of about 100 KiB per request exceeds the 10 %."""
    half = samples[-1][1] / 2
    early = max(r for _, n, r in samples if n <= half)
    late = max((r for _, n, r in samples if n > half), default=early)
    return early, late


def test_soak(server_model):
    pytest.importorskip("psutil")
    srv = Server(server_model, "--max-num-seqs", "4", "--max-queued-requests", "2", "--served-model-name", "soak")
    stop = threading.Event()
    samples: list[tuple[float, int, int]] = []
    try:
        max_len = srv.max_model_len
        rng = random.Random(0)
        long_prompt = prompt(rng, max_len)  # cut to max_len - 24 tokens below
        ids = httpx.post(srv.url + "/tokenize", json={"prompt": long_prompt}, timeout=30).json()["tokens"]
        ids = ids[: max_len - 24]
        long_prompt = httpx.post(srv.url + "/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"]
        long_tokens = httpx.post(srv.url + "/tokenize", json={"prompt": long_prompt}, timeout=30).json()["count"]
        assert max_len - 32 <= long_tokens < max_len

        tally = Tally()
        sampler = threading.Thread(target=sample_rss, args=(srv.proc.pid, samples, tally, stop), daemon=True)
        sampler.start()
        t0 = time.monotonic()

        async def run():
            stop_at = time.monotonic() + SOAK_SECONDS
            await asyncio.gather(*(client_loop(srv.url, seed, stop_at, tally, long_prompt, long_tokens, max_len)
                                   for seed in range(NUM_CLIENTS)))

        asyncio.run(run())
        wall = time.monotonic() - t0
        m = srv.wait_metric("strata:num_requests_running", lambda v: v == 0, timeout=30)
        m = srv.wait_metric("strata:num_requests_waiting", lambda v: v == 0, timeout=30)
        m = srv.wait_metric("strata:kv_cache_usage_perc", lambda v: v == 0, timeout=30)
        stop.set()
        sampler.join(5)
        early, late = rss_bound(samples)
        end = samples[-1][2]
        mib = 1 << 20
        print(f"\nsoak {wall:.0f} s, {NUM_CLIENTS} clients: {tally.counts}; "
              f"RSS start {samples[0][2] / mib:.0f} MiB, warm-up peak {early / mib:.0f}, later peak "
              f"{late / mib:.0f}, end {end / mib:.0f} ({len(samples)} samples); "
              f"preemptions {m.get('strata:num_preemptions_total', 0):.0f}")
        step = max(SOAK_SECONDS / 12, 1.0)  # the RSS curve: peak of each twelfth of the run
        curve = [max((r for t, _, r in samples if i * step <= t < (i + 1) * step), default=0) // mib for i in range(13)]
        print(f"RSS MiB by {step:.0f} s: {curve}")
        assert tally.counts["lost"] == 0, tally.failures
        assert tally.counts["completed"] > 0 and tally.counts["disconnects"] > 0
        assert tally.counts["retried_429"] > 0, "the load never filled the queue: the retry path went untested"
        assert late <= early * RSS_GROWTH, f"RSS grew from {early / mib:.0f} to {late / mib:.0f} MiB"
        assert srv.proc.poll() is None
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        assert "Traceback" not in srv.read_log(), srv.read_log()[-4000:]
    finally:
        stop.set()
        srv.stop()
