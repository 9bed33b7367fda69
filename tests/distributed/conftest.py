"""The distributed tests' harness: a watchdog that ends a hung run, a tiny engine, greedy decoding."""

import faulthandler

import pytest

from strata.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.sampling_params import SamplingParams

WATCHDOG_S = 240
PROMPTS = [[1, 17, 42, 99, 5], [1, 250, 3, 3, 71, 8, 64, 12, 33, 150, 7], [1, 9]]


@pytest.fixture(autouse=True)
def watchdog():
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)  # a hung collective ends the run with tracebacks
    yield
    faulthandler.cancel_dump_traceback_later()


def make_engine(path, tp: int, **knobs) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), dtype="float32", tensor_parallel_size=tp, num_threads=1,
                                  max_num_batched_tokens=8, kv_cache_memory=2**20, **knobs), progress=False)


def greedy(engine: LLMEngine) -> list[list[int]]:
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True), request_id=str(i))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[str(i)] for i in range(len(PROMPTS))]
