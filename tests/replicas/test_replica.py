"""EngineReplica in this process (no Ray): with a stream interval its generate call yields merged outputs, fewer
than one per step, and the tokens are those of a plain engine run."""

import asyncio
import dataclasses

import pytest

from strata.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.sampling_params import SamplingParams
from strata.replicas.replica import EngineReplica
from tests.models.conftest import build_hf

PROMPT = [1, 17, 42, 99, 5, 250, 3, 3]
PARAMS = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("replica") / "m"
    build_hf("qwen3_moe", path)
    return EngineConfig(model=str(path), dtype="float32", num_threads=1)


def _generate(config, stream_interval_ms: float) -> list[list[int]]:
    replica = EngineReplica(dataclasses.asdict(config), stream_interval_ms=stream_interval_ms)

    async def main():
        await replica.start()
        return [list(out.outputs[0].token_ids) async for out in replica.generate("r", PROMPT, PARAMS)]

    try:
        return asyncio.run(main())
    finally:
        replica.shutdown()


def test_stream_interval_merges_outputs_and_keeps_the_tokens(config):
    engine = LLMEngine(config, progress=False)
    engine.add_request(PROMPT, PARAMS, request_id="r")
    want = None
    while engine.has_unfinished_requests():
        want = next((o.outputs[0].token_ids for o in engine.step() if o.finished), want)
    merged = _generate(config, stream_interval_ms=10_000)
    assert merged[-1] == want
    assert len(merged) <= 3  # the first token and the end go out at once; the 62 between wait for the interval
    assert _generate(config, stream_interval_ms=0)[-1] == want
