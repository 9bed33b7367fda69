"""The replica router's policy without Ray (fake actors, one event loop): most free KV blocks first, then the
fewest requests in flight; a replica that dies before a request's first output hands it to another (the client
sees nothing), one that dies mid-stream fails that stream naming the replica; /health says degraded."""

import asyncio

import pytest

from strata.config import EngineConfig
from strata.engine.llm_engine import CompletionOutput, RequestOutput
from strata.engine.sampling_params import SamplingParams
from strata.replicas import router as router_mod
from strata.replicas.router import ReplicaDeadError, ReplicaRouter, _Replica
from strata.server.request_stream import EngineDeadError, RequestFailedError


class _Call:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)

    def options(self, **_):
        return self


class FakeActor:
    """generate yields `num_tokens` outputs, or dies (ReplicaDeadError) after `die_after` of them."""

    def __init__(self, free_blocks: int, die_after: int | None = None, num_tokens: int = 3):
        self.free_blocks, self.die_after, self.num_tokens = free_blocks, die_after, num_tokens
        self.requests: list[str] = []
        self.load = _Call(self._load)
        self.generate = _Call(self._generate)
        self.abort = _Call(lambda rid: None)

    async def _load(self):
        if self.die_after == 0:
            raise ReplicaDeadError("actor died")
        return {"num_free_blocks": self.free_blocks, "num_running": 0, "num_waiting": 0, "dead_reason": None}

    async def _generate(self, rid, ids, params, priority, timeout, migrated=None, handoff=False):
        self.requests.append(rid)
        for i in range(self.num_tokens):
            if self.die_after is not None and i >= self.die_after:
                raise ReplicaDeadError("actor died")
            out = RequestOutput(rid, ids, [CompletionOutput(0, "x" * (i + 1), "x", list(range(i + 1)),
                                                            "length" if i == self.num_tokens - 1 else None)],
                                i == self.num_tokens - 1)
            yield asyncio.sleep(0, out)


@pytest.fixture
def router(monkeypatch):
    monkeypatch.setattr(_Replica, "cancel", lambda self, gen: None)
    r = ReplicaRouter(EngineConfig(), 2)
    r.engine = object()  # the API's facts: not read here
    return r


def _with(router, *actors):
    router.replicas = [_Replica(i, a) for i, a in enumerate(actors)]
    for rep in router.replicas:
        rep.info = {"block_size": 16, "pid": 0}
    return router


async def _collect(router, prompt=(1, 2, 3)):
    return [out async for out in router.add_request(list(prompt), SamplingParams(max_tokens=3))]


def test_most_free_blocks_then_fewest_in_flight(router):
    _with(router, FakeActor(10), FakeActor(30), FakeActor(30))
    router.replicas[1].in_flight = 2
    assert asyncio.run(router.choose(set())).index == 2
    router.replicas[2].unreported_blocks = 25  # requests sent to it that it has not reported yet
    assert asyncio.run(router.choose(set())).index == 1


def test_a_replica_dead_before_the_first_output_hands_the_request_on(router):
    _with(router, FakeActor(99, die_after=0), FakeActor(10))
    router.replicas[0].actor.load = _Call(FakeActor(99)._load)  # answers the load query, dies in generate
    outs = asyncio.run(_collect(router))
    assert [o.outputs[0].text for o in outs] == ["x", "xx", "xxx"] and outs[-1].finished
    assert router.replicas[0].actor.requests and router.replicas[1].actor.requests
    health = router.health()
    assert health["status"] == "degraded" and [r["healthy"] for r in health["replicas"]] == [False, True]
    assert sum(r.in_flight for r in router.replicas) == 0 and router.is_ready


def test_a_replica_dead_mid_stream_fails_that_stream_and_gets_no_more(router):
    _with(router, FakeActor(99, die_after=1), FakeActor(10))
    with pytest.raises(RequestFailedError, match="replica 0 died while serving this request"):
        asyncio.run(_collect(router))
    assert [o.finished for o in asyncio.run(_collect(router))] == [False, False, True]
    assert len(router.replicas[1].actor.requests) == 1
    router.mark_dead(router.replicas[1], "gone")
    assert router.dead_reason == "every replica has died" and not router.is_ready
    with pytest.raises(EngineDeadError):
        router.add_request([1], SamplingParams())


def test_ray_missing_is_one_line(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(router_mod.ConfigError, match=r"needs Ray: pip install 'strata\[distributed\]'"):
        router_mod._ray()


def test_replica_stream_offers_what_the_server_reads_from_a_stream():
    """The SSE writer (server/responses.py) asks every stream whether an output is already waiting; a replica's
    stream answers no (its outputs arrive through Ray), so each chunk is written as it comes."""
    from strata.replicas.replica_stream import ReplicaStream
    from strata.server.request_stream import RequestStream

    for name in ("has_pending", "abort", "__aiter__", "__anext__"):
        assert hasattr(RequestStream, name) and hasattr(ReplicaStream, name), name
    stream = ReplicaStream.__new__(ReplicaStream)
    assert stream.has_pending is False
