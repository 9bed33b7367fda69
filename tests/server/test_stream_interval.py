"""Output hand-off from the engine thread: outputs a stream has not taken yet merge into one (their text deltas
joined, an error after them still comes after), and with a stream interval the steady outputs of a request wait
for the interval while its first token and its end go out at once, the text unchanged."""

from __future__ import annotations

import asyncio

import pytest

from strata.config import EngineConfig
from strata.engine.llm_engine import CompletionOutput, LLMEngine, RequestOutput
from strata.engine.sampling_params import SamplingParams
from strata.server.async_engine import AsyncEngine
from strata.server.request_stream import RequestFailedError, RequestStream


class _Owner:
    def abort(self, request_id: str) -> None:
        pass


def _out(step: int, finished: bool = False) -> RequestOutput:
    """Step `step`'s output of a two-choice request: choice 0 gained "a<step>", choice 1 "b<step>"."""
    outs = [CompletionOutput(i, "", f"{c}{step}", list(range(step + 1)), "length" if finished else None)
            for i, c in enumerate("ab")]
    return RequestOutput("r", [1, 2], outs, finished)


def test_waiting_outputs_merge_with_joined_deltas():
    async def main():
        stream = RequestStream(_Owner(), "r", None)
        for step in range(3):
            stream.queue.put_nowait(_out(step))
        stream.queue.put_nowait(RequestFailedError("boom"))
        merged = await stream.__anext__()
        assert [o.delta for o in merged.outputs] == ["a0a1a2", "b0b1b2"]
        assert merged.outputs[0].token_ids == [0, 1, 2]  # the cumulative fields are the latest step's
        assert stream.has_pending  # the error, held back behind the merged output
        with pytest.raises(RequestFailedError):
            await stream.__anext__()

    asyncio.run(main())


def test_finished_output_is_not_merged_with_a_later_item():
    async def main():
        stream = RequestStream(_Owner(), "r", None)
        stream.queue.put_nowait(_out(0))
        stream.queue.put_nowait(_out(1, finished=True))
        last = await stream.__anext__()
        assert last.finished and [o.delta for o in last.outputs] == ["a0a1", "b0b1"]
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()

    asyncio.run(main())


@pytest.fixture(scope="module")
def llm_engine(tiny_model):
    return LLMEngine(EngineConfig(model=str(tiny_model), max_num_seqs=4), progress=False)


async def _collect(engine: LLMEngine, interval_ms: float, ids: list[int], params: SamplingParams) -> list:
    ae = AsyncEngine(lambda: engine, stream_interval_ms=interval_ms)
    ae.start(asyncio.get_running_loop())
    while not ae.is_ready:
        await asyncio.sleep(0.01)
    try:
        return [out async for out in ae.add_request(ids, params)]
    finally:
        ae.shutdown()


def test_stream_interval_sends_first_and_last_at_once_and_keeps_the_text(llm_engine):
    ids = llm_engine.tokenizer.encode("the quick brown fox")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    every = asyncio.run(_collect(llm_engine, 0.0, ids, params))
    # an interval no test outlasts: only the first token and the end wake the loop, the rest waits and merges
    held = asyncio.run(_collect(llm_engine, 1e9, ids, params))
    assert held[-1].finished and len(held[-1].outputs[0].token_ids) == 12
    assert len(held) <= 2
    text = held[-1].outputs[0].text
    assert text == every[-1].outputs[0].text
    assert "".join(o.outputs[0].delta for o in held) == text == "".join(o.outputs[0].delta for o in every)
