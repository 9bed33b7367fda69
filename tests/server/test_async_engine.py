"""AsyncEngine in-process: a failure inside one request fails only that request, a dying engine loop turns
/health to 503 and fails pending requests, and a per-request timeout aborts and frees blocks."""

from __future__ import annotations

import asyncio

import httpx
import pytest

import strata.engine.sampler as sampler_mod
from strata.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.sampling_params import SamplingParams
from strata.server.app import create_app
from strata.server.async_engine import AsyncEngine
from strata.server.request_stream import EngineDeadError, RequestFailedError, RequestTimeoutError


@pytest.fixture(scope="module")
def llm_engine(tiny_model):
    return LLMEngine(EngineConfig(model=str(tiny_model), max_num_seqs=4), progress=False)


async def _started(engine: LLMEngine, **kw) -> AsyncEngine:
    ae = AsyncEngine(lambda: engine, **kw)
    ae.start(asyncio.get_running_loop())
    while not ae.is_ready and ae.dead_reason is None:
        await asyncio.sleep(0.01)
    return ae


async def _drain(stream) -> list:
    return [out async for out in stream]


async def _all_blocks_free(engine: LLMEngine) -> None:
    bm = engine.block_manager
    for _ in range(2000):
        if bm.num_free_blocks == bm.num_blocks and not engine.has_unfinished_requests():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{bm.num_blocks - bm.num_free_blocks} blocks still used")


def test_failure_in_one_request_fails_only_it(llm_engine, monkeypatch):
    real = sampler_mod.draw

    def poisoned(probs, seqs):
        if any(seq.params.seed == 666 for seq in seqs):
            raise ValueError("poisoned sampling")
        return real(probs, seqs)

    monkeypatch.setattr(sampler_mod, "draw", poisoned)

    async def main():
        ae = await _started(llm_engine)
        ids = llm_engine.tokenizer.encode("the quick brown fox")
        good = ae.add_request(ids, SamplingParams(temperature=0.7, seed=1, max_tokens=6, ignore_eos=True))
        bad = ae.add_request(ids, SamplingParams(temperature=0.7, seed=666, max_tokens=6, ignore_eos=True))
        outs, err = await asyncio.gather(_drain(good), _drain(bad), return_exceptions=True)
        assert isinstance(err, RequestFailedError) and "poisoned" in str(err)
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 6
        again = await _drain(ae.add_request(ids, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)))
        assert len(again[-1].outputs[0].token_ids) == 3 and ae.dead_reason is None
        await _all_blocks_free(llm_engine)
        ae.shutdown()

    asyncio.run(main())


def test_engine_death_gives_503_and_fails_pending(llm_engine, monkeypatch):
    async def main():
        ae = await _started(llm_engine)
        app = create_app(ae, "tiny")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/health")).status_code == 200

            def broken():
                raise RuntimeError("device lost")

            monkeypatch.setattr(llm_engine, "step", broken)
            ids = llm_engine.tokenizer.encode("the")
            with pytest.raises((RequestFailedError, EngineDeadError)):
                await _drain(ae.add_request(ids, SamplingParams(max_tokens=3)))
            while ae.dead_reason is None:
                with pytest.raises((RequestFailedError, EngineDeadError)):
                    await _drain(ae.add_request(ids, SamplingParams(max_tokens=3)))
            r = await c.get("/health")
            assert r.status_code == 503 and "device lost" in r.json()["error"]["message"]
            r = await c.post("/v1/completions", json={"prompt": "the", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        monkeypatch.undo()
        llm_engine.scheduler.waiting.clear()
        for seq in list(llm_engine.scheduler.running):
            llm_engine.scheduler.finish(seq)

    asyncio.run(main())


def test_request_timeout_aborts_and_frees(llm_engine):
    async def main():
        ae = await _started(llm_engine)
        ids = llm_engine.tokenizer.encode("the quick brown fox")
        stream = ae.add_request(ids, SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True), timeout=0.3)
        with pytest.raises(RequestTimeoutError):
            await _drain(stream)
        await _all_blocks_free(llm_engine)
        ae.shutdown()

    asyncio.run(main())


def test_n_siblings_share_the_prompt_blocks(llm_engine):
    bm = llm_engine.block_manager
    ids = llm_engine.tokenizer.encode("the quick brown fox jumps over the lazy dog. " * 4)
    full_blocks = (len(ids) - 1) // bm.block_size
    hits0 = bm.num_prefix_hits
    llm_engine.add_request(ids + [7], SamplingParams(n=3, temperature=0, max_tokens=4, ignore_eos=True))
    outs = []
    while llm_engine.has_unfinished_requests():  # an AsyncEngine has run it: outputs may be deferred (resolve)
        outs.extend(o for o in (out.resolve() for out in llm_engine.step()) if o.finished)
    texts = [o.token_ids for o in outs[0].outputs]
    assert len(texts) == 3 and texts[0] == texts[1] == texts[2]
    assert bm.num_prefix_hits - hits0 >= 2 * full_blocks * bm.block_size  # both siblings reused the prompt
    assert bm.num_free_blocks == bm.num_blocks


def test_health_503_while_loading(llm_engine):
    import threading

    release = threading.Event()

    def slow_factory():
        release.wait(30)
        return llm_engine

    async def main():
        ae = AsyncEngine(slow_factory)
        ae.start(asyncio.get_running_loop())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ae, "tiny")),
                                     base_url="http://t") as c:
            r = await c.get("/health")
            assert r.status_code == 503 and r.json()["error"]["message"] == "Loading model"
            r = await c.post("/v1/completions", json={"prompt": "the", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
            release.set()
            while not ae.is_ready:
                await asyncio.sleep(0.01)
            assert (await c.get("/health")).status_code == 200
            r = await c.post("/v1/completions", json={"prompt": "the", "max_tokens": 2})
            assert r.status_code == 200, r.text
        ae.shutdown()

    asyncio.run(main())


def test_streams_carry_the_outputs_the_engine_builds_in_its_step(tiny_model):
    """The engine thread leaves detokenizing to the event loop (DeferredOutput); what the streams get is what a
    step builds at once, field for field, and the deltas add up to the text."""
    import dataclasses

    requests = [SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
                SamplingParams(temperature=1.0, seed=4, max_tokens=12, logprobs=2, ignore_eos=True),
                SamplingParams(n=2, temperature=1.0, seed=6, max_tokens=8, ignore_eos=True),
                None,  # greedy again, with a stop string from the first one's text
                SamplingParams(temperature=0.5, seed=10, max_tokens=6, prompt_logprobs=1)]

    def fields(out):
        return {k: v for k, v in dataclasses.asdict(out).items() if k not in ("request_id", "metrics")}

    def config():
        return EngineConfig(model=str(tiny_model), max_num_seqs=4, num_threads=1)

    eager = LLMEngine(config(), progress=False)
    ids = eager.tokenizer.encode("the quick brown fox")
    want = []
    for i, params in enumerate(requests):  # one at a time: the same batches as below
        if params is None:
            requests[i] = params = SamplingParams(temperature=0, max_tokens=20, stop=[want[0].outputs[0].text[3:5]])
        eager.add_request(ids, params)
        while eager.has_unfinished_requests():
            want.extend(o for o in eager.step() if o.finished)

    async def main():
        ae = await _started(LLMEngine(config(), progress=False))
        got = []
        for params in requests:
            outs = await _drain(ae.add_request(ids, params))
            texts = ["".join(o.outputs[i].delta for o in outs) for i in range(params.n)]
            assert texts == [o.text for o in outs[-1].outputs]
            got.append(outs[-1])
        ae.shutdown()
        return got

    got = asyncio.run(main())
    assert [fields(g) for g in got] == [fields(w) for w in want]
    assert got[3].outputs[0].finish_reason == "stop" and got[1].outputs[0].logprobs
