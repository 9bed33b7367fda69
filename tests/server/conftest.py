"""Real `strata serve` processes on free loopback ports, shared by the server tests (one per configuration)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "strata" / "assets" / "models" / "shakespeare-moe"
API_KEY = "sk-test-strata"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *flags: str, positional: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        where = [str(model)] if positional else ["--model", str(model)]  # `strata serve MODEL`, as vLLM
        cmd = [sys.executable, "-m", "strata.cli", "serve", *where, "--port", str(self.port),
               "--log-level", "warning", "--num-threads", "1", *flags]
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - lives with the process; never in the package
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    @property
    def max_model_len(self) -> int:
        return httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]["max_model_len"]

    def long_request(self, prompt: str = "the quick brown fox") -> dict:
        """A greedy request that runs to the end of the context (the longest generation the model allows)."""
        return {"prompt": prompt, "max_tokens": self.max_model_len - 64, "temperature": 0, "ignore_eos": True}

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            m = re.match(r'^(strata:[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$', line)
            if m:
                reason = re.search(r'finished_reason="([a-z]+)"', m.group(2) or "")
                out[m.group(1) + (f"[{reason.group(1)}]" if reason else "")] = float(m.group(3))
        return out

    def wait_metric(self, name: str, pred, timeout: float = 60.0) -> dict:
        """Polls /metrics until pred(value) holds; a generous guard, not a timing assertion."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if pred(m.get(name, 0.0)):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} stayed at {m.get(name)}")
            time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random MoE with a 4096-token context (long generations) and a chat template using kwargs."""
    from tests.server.tiny_model import build_tiny_server_model

    return build_tiny_server_model(tmp_path_factory.mktemp("server") / "tiny")


@pytest.fixture(scope="session")
def server_model(tiny_model) -> Path:
    """The model of the main test server: STRATA_SERVER_TEST_MODEL, else the bundled model, else the tiny one."""
    if os.environ.get("STRATA_SERVER_TEST_MODEL"):
        return Path(os.environ["STRATA_SERVER_TEST_MODEL"])
    return BUNDLED if (BUNDLED / "model.safetensors").exists() else tiny_model


@pytest.fixture(scope="session")
def server(server_model):
    # float32: in bf16 the batch-1 GEMV and the batched matmul round differently, which can flip a greedy tie
    srv = Server(server_model, "--max-num-seqs", "16", "--served-model-name", "tiny", "--dtype", "float32")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def guarded_server(tiny_model):
    """API key, one running sequence, a waiting queue of one, a request timeout."""
    srv = Server(tiny_model, "--max-num-seqs", "1", "--max-queued-requests", "1", "--api-key", API_KEY,
                 "--served-model-name", "tiny", "--request-timeout", "600", "--max-body-bytes", "4096")
    yield srv
    srv.stop()
