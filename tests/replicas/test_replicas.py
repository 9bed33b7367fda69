"""`strata serve --data-parallel-size 2` (slow marker: `pytest -m slow tests/replicas/test_replicas.py`): two engine replicas as Ray actors behind one OpenAI endpoint. Greedy
streams through the replicas equal one engine's output, the router uses both replicas, and a replica killed
mid-stream ends that stream with an error event, leaves /health degraded and the other replica serving."""

import os
import signal

import httpx
import pytest

pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from strata.engine.sampling_params import SamplingParams
from strata.llm import LLM
from tests.server.conftest import Server
from tests.server.tiny_model import build_tiny_server_model

pytestmark = pytest.mark.slow  # Ray starts a local cluster per server: minutes on two shared cores

PROMPTS = ["the quick brown fox", "hello world", "lazy dog jumps", "unicode text ok"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_server_model(tmp_path_factory.mktemp("replicas") / "tiny")


@pytest.fixture(scope="module")
def server(model):
    srv = Server(model, "--data-parallel-size", "2", "--dtype", "float32", "--served-model-name", "tiny")
    yield srv
    srv.stop()


def _one_engine(model, prompts=PROMPTS, max_tokens: int = 12) -> list[str]:
    llm = LLM(str(model), progress=False, dtype="float32", num_threads=1)
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return [o.outputs[0].text for o in outs]


def _stream(client, prompt: str, max_tokens: int = 12) -> str:
    chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    return "".join(c.choices[0].text for c in chunks if c.choices)


def test_streams_through_two_replicas_equal_one_engine(server, model):
    from concurrent.futures import ThreadPoolExecutor

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda p: _stream(client, p), PROMPTS))
    assert got == _one_engine(model)
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and [r["num_served"] > 0 for r in health["replicas"]] == [True, True]


def test_a_request_migrated_mid_stream_gives_the_unmigrated_output(server, model):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    want = _one_engine(model, ["the moving one"], 80)[0]
    stream = client.completions.create(model="tiny", prompt="the moving one", max_tokens=80, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    text = next(chunks).choices[0].text
    moved = httpx.post(server.url + "/admin/migrate", json={}, timeout=60).json()
    assert moved["from"] != moved["to"] and moved["downtime_s"] >= 0
    text += "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want
    assert 'strata:migrations_total{model_name="tiny"} 1.0' in httpx.get(server.url + "/metrics", timeout=10).text


def test_prefill_decode_disaggregation_gives_the_colocated_output(model):
    from concurrent.futures import ThreadPoolExecutor

    srv = Server(model, "--data-parallel-size", "2", "--pd-disaggregation", "--dtype", "float32",
                 "--served-model-name", "tiny")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            got = list(pool.map(lambda p: _stream(client, p), PROMPTS))
        assert got == _one_engine(model)
        replicas = httpx.get(srv.url + "/health", timeout=10).json()["replicas"]
        assert [r["role"] for r in replicas] == ["prefill", "decode"]
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        assert f'strata:migrations_total{{model_name="tiny"}} {float(len(PROMPTS))}' in metrics
    finally:
        srv.stop()


def test_a_killed_replica_ends_its_stream_with_an_error_and_the_other_serves(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    stream = client.completions.create(model="tiny", prompt="a long one", max_tokens=3000, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))  # the request is running on one replica
    replicas = httpx.get(server.url + "/health", timeout=10).json()["replicas"]
    busy = [r for r in replicas if r["num_requests"]]
    assert len(busy) == 1
    os.kill(busy[0]["pid"], signal.SIGKILL)
    with pytest.raises(openai.APIError, match=f"replica {busy[0]['index']} died while serving this request"):
        for _ in stream:
            pass
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert [r["healthy"] for r in health.json()["replicas"]] == [r["index"] != busy[0]["index"] for r in replicas]
    assert _stream(client, "after the crash", 4)  # the router sends it to the replica left
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert f'strata:replica_healthy{{model_name="tiny",replica="{busy[0]["index"]}"}} 0.0' in metrics


def test_enable_migration_moves_a_request_off_the_busier_replica(model):
    """Two long requests on one replica, a short one with a long prompt on the other: once the short one ends,
    the load check moves one long request to the idle replica, and both stream the unmigrated text."""
    import threading
    import time

    # checks every 20 ms: the long requests of this tiny model outlast the short one by a few hundred ms only
    srv = Server(model, "--data-parallel-size", "2", "--enable-migration", "--migration-interval", "0.02",
                 "--dtype", "float32", "--served-model-name", "tiny")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        longs = ["first long one", "second long one"]
        want = _one_engine(model, longs, 600)
        got, threads = {}, []

        def run(prompt, max_tokens):
            got[prompt] = _stream(client, prompt, max_tokens)

        def start(prompt, max_tokens):
            t = threading.Thread(target=run, args=(prompt, max_tokens))
            t.start()
            threads.append(t)
            deadline = time.monotonic() + 60
            while sum(r["num_served"] for r in httpx.get(srv.url + "/health", timeout=10).json()["replicas"]) \
                    < len(threads) and time.monotonic() < deadline:  # placed on a replica
                time.sleep(0.01)

        start(longs[0], 600)  # replica 0 (both idle: the first)
        start(" ".join(["many words in a long prompt"] * 20), 16)  # more free blocks on replica 1
        start(longs[1], 600)  # replica 0 (replica 1 holds the long prompt's blocks)
        for t in threads:
            t.join(120)
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        assert 'strata:migrations_total{model_name="tiny"} 0.0' not in metrics
        assert [got[p] for p in longs] == want
    finally:
        srv.stop()
