"""The request guard before routing: Host and Origin checks against DNS rebinding and cross-site posts, a
time limit on receiving the body, and no buffering of bodies sent to paths that are not API routes."""

from __future__ import annotations

import asyncio

import pytest

from strata.server.app import GuardMiddleware
from strata.server.request_checks import LOOPBACK_HOSTS
from tests.server.inprocess import app_client

BODY = {"prompt": "hi", "max_tokens": 1}


@pytest.fixture(scope="module")
def loopback():
    """As `strata serve` builds it on 127.0.0.1 (the default), with one allowed browser origin."""
    kw = {"allowed_hosts": LOOPBACK_HOSTS, "allowed_origins": ["https://app.example"]}
    with app_client(app_kw=kw, base_url="http://127.0.0.1:8000") as c:
        yield c


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost", "[::1]:8000", "LOCALHOST:1"])
def test_loopback_host_names_are_served(loopback, host):
    assert loopback.post("/v1/completions", json=BODY, headers={"host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::1", ""])
def test_other_host_names_are_refused(loopback, host):
    r = loopback.post("/v1/completions", json=BODY, headers={"host": host})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"


@pytest.mark.parametrize("origin,status", [
    ("http://localhost:5173", 200), ("http://127.0.0.1", 200), ("https://app.example", 200),
    ("https://evil.example", 403), ("null", 403), ("http://localhost.evil.example", 403),
])
def test_browser_origins(loopback, origin, status):
    r = loopback.post("/v1/completions", json=BODY, headers={"origin": origin})
    assert r.status_code == status, r.text
    if status == 403:
        assert r.json()["error"]["code"] == "origin_not_allowed"


def _call(guard, path: str, receive) -> list[dict]:
    sent = []

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-type", b"application/json")]}
    asyncio.run(asyncio.wait_for(guard(scope, receive, send), 10))
    return sent


def test_a_stalled_body_gets_408():
    async def never_done():  # one chunk, then nothing: a client that stopped sending
        if not hasattr(never_done, "sent"):
            never_done.sent = True
            return {"type": "http.request", "body": b'{"prompt": "', "more_body": True}
        await asyncio.sleep(3600)

    async def app(scope, receive, send):
        raise AssertionError("the route must not run")

    sent = _call(GuardMiddleware(app, None, 4096, body_timeout=0.2), "/v1/completions", never_done)
    assert sent[0]["status"] == 408


def test_bodies_for_other_paths_are_not_buffered():
    reached = []

    async def receive():
        raise AssertionError("the guard must not read this body")

    async def app(scope, receive, send):
        reached.append(scope["path"])

    _call(GuardMiddleware(app, "key", 4096), "/health", receive)
    assert reached == ["/health"]
