"""Live migration through the router with two real engine replicas in this process (no Ray: each EngineReplica
is called the way the router calls a Ray actor). A request moved mid-stream in pre-copy stages, and requests
moved by the load-balancing check, stream exactly the tokens of an unmigrated run; the stop-and-copy moves only
the last tokens, and every replica's KV blocks are free at the end."""

import asyncio
import contextlib
import dataclasses
import inspect
import time

import pytest

from strata.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.sampling_params import SamplingParams
from strata.replicas.live_migration import MigrationConfig
from strata.replicas.migration_policy import MigrationScheduler
from strata.replicas.replica import EngineReplica
from strata.replicas.router import ReplicaRouter, _Replica
from tests.models.conftest import build_hf

PROMPTS = [[1, 17, 42, 99, 5, 250, 3, 3, 71, 8, 64, 12, 33, 150, 7, 9, 21, 40], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13]]


class _Method:
    """One actor method called like Ray's: `.remote()` -> an awaitable (an async iterator of awaitables for a
    streaming method), awaitable arguments resolved first as Ray resolves ObjectRefs."""

    def __init__(self, fn):
        self.fn = fn

    def options(self, **_):
        return self

    def remote(self, *args):
        return self._stream(args) if inspect.isasyncgenfunction(self.fn) else self._call(args)

    @staticmethod
    async def _resolve(args):
        return [await a if inspect.isawaitable(a) else a for a in args]

    async def _call(self, args):
        out = self.fn(*await self._resolve(args))
        return await out if inspect.isawaitable(out) else out

    async def _stream(self, args):
        async for item in self.fn(*await self._resolve(args)):
            yield asyncio.sleep(0, item)


class LocalActor:
    def __init__(self, replica: EngineReplica):
        self.replica = replica

    def __getattr__(self, name):
        return _Method(getattr(self.replica, name))


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("live_migration") / "m"
    build_hf("qwen3_moe", path)
    return EngineConfig(model=str(path), dtype="float32", num_threads=1, block_size=4, kv_cache_memory=2**20)


def _reference(config, params) -> list[list[int]]:
    engine = LLMEngine(config, progress=False)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(prompt, params, request_id=str(i))
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return [done[str(i)] for i in range(len(PROMPTS))]


@contextlib.asynccontextmanager
async def _replicas(config, monkeypatch, migration: MigrationConfig):
    """A router over two engine replicas in this process (no Ray), shut down on leaving."""
    monkeypatch.setattr(_Replica, "cancel", lambda self, gen: None)
    router = ReplicaRouter(config, 2, migration=migration)
    fields = dataclasses.asdict(config)
    router.replicas = [_Replica(i, LocalActor(EngineReplica(fields))) for i in range(2)]
    try:
        for r in router.replicas:
            r.info = await r.actor.start.remote()
        router.engine = object()
        yield router
    finally:
        for r in router.replicas:
            r.actor.replica.shutdown()


async def _consume(stream, tokens: list[int], started: asyncio.Event, after: int) -> None:
    async for out in stream:
        tokens[:] = out.outputs[0].token_ids
        if len(tokens) >= after:
            started.set()


def _all_free(router) -> bool:
    return all(r.actor.replica.engine.engine.num_free_kv_blocks() == r.actor.replica.engine.engine.block_manager.
               num_blocks for r in router.replicas)


def test_live_migration_mid_stream_gives_the_unmigrated_tokens(config, monkeypatch):
    params = SamplingParams(max_tokens=160, temperature=0.0, ignore_eos=True)
    want = _reference(config, params)[0]

    async def main():
        async with _replicas(config, monkeypatch, MigrationConfig(migration_max_stages=3)) as router:
            stream = router.add_request(PROMPTS[0], params)
            tokens, started = [], asyncio.Event()
            consumer = asyncio.create_task(_consume(stream, tokens, started, after=12))
            await started.wait()
            src = stream.replica.index
            moved = await router.migrate(stream.request_id, 1 - src)
            await consumer
            return moved, tokens, src, router

    moved, tokens, src, router = asyncio.run(main())
    assert tokens == want
    assert moved["from"] == src and moved["to"] == 1 - src and moved["stages"] >= 2
    assert moved["num_precopied_tokens"] >= len(PROMPTS[0]) + 11  # what was computed when the first stage ran
    assert moved["num_stopped_tokens"] < moved["num_precopied_tokens"]
    assert moved["downtime_s"] > 0 and _all_free(router)
    assert router.replicas[1 - src].actor.replica.engine.engine.get_stats() is not None


def test_stop_and_copy_moves_the_whole_kv(config, monkeypatch):
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    want = _reference(config, params)[0]

    async def main():
        async with _replicas(config, monkeypatch, MigrationConfig()) as router:
            stream = router.add_request(PROMPTS[0], params)
            tokens, started = [], asyncio.Event()
            consumer = asyncio.create_task(_consume(stream, tokens, started, after=5))
            await started.wait()
            moved = await router.migrate(stream.request_id, max_stages=1)
            await consumer
            return moved, tokens, router

    moved, tokens, router = asyncio.run(main())
    assert tokens == want and moved["stages"] == 1 and moved["num_precopied_tokens"] == 0
    assert moved["num_stopped_tokens"] >= len(PROMPTS[0]) + 4 and _all_free(router)


def test_the_load_check_moves_a_request_off_the_busier_replica(config, monkeypatch):
    params = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    want = _reference(config, params)
    # steps of at least 2 ms: both requests still decode when the check runs (a float32 step of this model takes a
    # fraction of a millisecond in the one-call decode, and 120 tokens could end before the check looked)
    step = LLMEngine.step
    monkeypatch.setattr(LLMEngine, "step", lambda self: (time.sleep(0.002), step(self))[1])

    async def main():
        async with _replicas(config, monkeypatch, MigrationConfig(enable_migration=True)) as router:
            busy = router.replicas[0]

            async def always_busy(tried, prefill=True):
                return busy

            monkeypatch.setattr(router, "choose", always_busy)  # both requests land on replica 0
            streams = [router.add_request(p, params) for p in PROMPTS]
            tokens = [[], []]
            events = [asyncio.Event(), asyncio.Event()]
            consumers = [asyncio.create_task(_consume(s, t, e, after=4))
                         for s, t, e in zip(streams, tokens, events, strict=True)]
            for e in events:
                await e.wait()
            scheduler = MigrationScheduler(router, router.migration)
            moved = await scheduler.check()
            again = await scheduler.check()  # one request on each replica now: balanced
            await asyncio.gather(*consumers)
            return moved, again, tokens, [s.replica.index for s in streams], router

    moved, again, tokens, placed, router = asyncio.run(main())
    assert tokens == want
    assert moved["from"] == 0 and moved["to"] == 1 and again is None
    assert moved["request_id"].endswith("-1")  # the shorter prompt: the least KV to copy
    assert sorted(placed) == [0, 1] and _all_free(router)


def test_a_refused_migration_leaves_the_request_streaming_where_it_runs(config, monkeypatch):
    from strata.replicas.router import MigrationRefused

    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True, n=2)

    async def main():
        async with _replicas(config, monkeypatch, MigrationConfig()) as router:
            stream = router.add_request(PROMPTS[0], params)
            tokens, started = [], asyncio.Event()
            consumer = asyncio.create_task(_consume(stream, tokens, started, after=3))
            await started.wait()
            with pytest.raises(MigrationRefused, match="has n > 1 sequences; only n = 1 migrates"):
                await router.migrate(stream.request_id)
            await consumer
            return tokens, stream, router

    tokens, stream, router = asyncio.run(main())
    assert len(tokens) == 60 and stream.migration is None and _all_free(router)
