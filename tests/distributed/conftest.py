"""The distributed tests' harness: a watchdog that ends a hung run, a tiny engine, greedy decoding."""

import faulthandler

import pytest

from strata.config import EngineConfig
from strata.distributed.launcher import shutdown
from strata.engine.llm_engine import LLMEngine
from strata.engine.sampling_params import SamplingParams
from strata.errors import DistributedError

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


def kill_rank_1_then_step(engine: LLMEngine) -> None:
    """Kill worker rank 1 of a running tensor-parallel engine: the next step must end with the one-line error
    and stop the ranks."""
    ranks = engine.model.__dict__["_tp_ranks"]
    try:
        ranks.procs[0].kill()
        ranks.procs[0].join()
        engine.add_request(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0))
        with pytest.raises(DistributedError, match=r"^tensor-parallel rank 1 exited with code -9; the other ranks "
                                                   r"were stopped$"):
            while engine.has_unfinished_requests():
                engine.step()
    finally:
        shutdown(engine.model)
    assert ranks.stopped
