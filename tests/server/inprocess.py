"""The server app in this process (Starlette's TestClient runs its lifespan): fast, and any exception that
escapes the app's handlers (the ones that would log a traceback and close the connection under uvicorn) is
raised in the test instead of being hidden in a 500."""

from __future__ import annotations

import time
from contextlib import contextmanager

from starlette.testclient import TestClient

from strata.config import EngineConfig
from strata.engine.llm_engine import BUNDLED_MODEL, LLMEngine
from strata.server.app import create_app
from strata.server.async_engine import AsyncEngine
from strata.server.metrics import EngineMetrics

NAME = "tiny"


@contextmanager
def app_client(factory=None, max_queued_requests: int | None = 64, wait_ready: bool = True, app_kw=None,
               base_url: str = "http://testserver", **engine_kw):
    """A TestClient on the bundled model (or `factory()`'s engine), ready to serve; app_kw go to create_app."""
    kw = {"model": BUNDLED_MODEL, "num_threads": 1, "dtype": "float32", **engine_kw}
    factory = factory or (lambda: LLMEngine(EngineConfig(**kw), progress=False))
    engine = AsyncEngine(factory, EngineMetrics(NAME), max_queued_requests=max_queued_requests)
    with TestClient(create_app(engine, NAME, **(app_kw or {})), base_url=base_url) as client:
        deadline = time.monotonic() + 60
        while wait_ready and not engine.is_ready:
            assert engine.dead_reason is None and time.monotonic() < deadline, engine.dead_reason
            time.sleep(0.02)
        client.engine = engine
        yield client


def metric(client: TestClient, name: str) -> float:
    """A sample of /metrics; `name` may include the start of its labels (`x{finished_reason="abort"`)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith((name + "{", name + " ", name + ",")):
            return float(line.rsplit(" ", 1)[1])
    if "{" in name:  # a labelled counter appears on its first increment
        return 0.0
    raise KeyError(name)


def wait_idle(client: TestClient, timeout: float = 30.0) -> None:
    """Polls /metrics until nothing runs, waits or holds KV blocks (gauges are published after each step,
    so they may lag the last response by one step); a generous guard, not a timing assertion."""
    names = ("strata:num_requests_running", "strata:num_requests_waiting", "strata:kv_cache_blocks_used")
    deadline = time.monotonic() + timeout
    while True:
        values = {n: metric(client, n) for n in names}
        if not any(values.values()):
            return
        assert time.monotonic() < deadline, f"engine not idle: {values}"
        time.sleep(0.02)
