"""Concurrency and disconnects: 16 concurrent greedy requests equal sequential ones; a client that goes away
(streaming or not) has its request aborted and its KV blocks freed, as /metrics shows."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx


def test_16_concurrent_greedy_equal_sequential(server):
    prompts = [f"{w} the lazy dog number {i}" for i, w in enumerate(["quick", "brown", "fox", "jumps"] * 4)]
    body = lambda p: {"model": "tiny", "prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=120) as c:
        sequential = [c.post("/v1/completions", json=body(p)).json()["choices"][0]["text"] for p in prompts]

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            rs = await asyncio.gather(*(c.post("/v1/completions", json=body(p)) for p in prompts))
        return [r.json()["choices"][0]["text"] for r in rs]

    assert asyncio.run(all_at_once()) == sequential


def _aborted(m: dict) -> float:
    return m.get("strata:request_success_total[abort]", 0.0)


def test_streaming_disconnect_frees_blocks(server):
    before = _aborted(server.metrics())
    with httpx.stream("POST", server.url + "/v1/completions", json={**server.long_request(), "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.metrics()["strata:kv_cache_blocks_used"] > 0
    m = server.wait_metric("strata:num_requests_running", lambda v: v == 0)
    m = server.wait_metric("strata:kv_cache_blocks_used", lambda v: v == 0)
    assert _aborted(m) == before + 1


def test_non_streaming_disconnect_frees_blocks(server):
    before = _aborted(server.metrics())
    payload = json.dumps(server.long_request()).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    server.wait_metric("strata:num_requests_running", lambda v: v == 1)
    sock.close()
    m = server.wait_metric("strata:kv_cache_blocks_used", lambda v: v == 0)
    assert m["strata:num_requests_running"] == 0
    assert _aborted(m) == before + 1


def test_metrics_exposed(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hit_rate",
                 "prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket",
                 "request_queue_time_seconds_bucket", 'request_success_total{finished_reason="length"'):
        assert "strata:" + name in text, name
