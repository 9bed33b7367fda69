"""--distributed-executor-backend ray: the worker rank as a Ray actor gives one process's greedy output, and an
actor that dies ends the next step with the one-line error (slow marker: Ray starts a local cluster)."""

import pytest

from strata.distributed.launcher import shutdown
from strata.engine.sampling_params import SamplingParams
from strata.errors import DistributedError
from tests.distributed.conftest import PROMPTS, greedy, make_engine
from tests.models.conftest import build_hf

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    yield
    ray.shutdown()


def test_ray_ranks_equal_one_process_then_a_dead_rank_ends_the_step(tmp_path):
    build_hf("qwen3", tmp_path)
    want = greedy(make_engine(tmp_path, 1))
    engine = make_engine(tmp_path, 2, distributed_executor_backend="ray")
    ranks = engine.model.__dict__["_tp_ranks"]
    try:
        assert greedy(engine) == want
        ranks.procs[0].kill()
        engine.add_request(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0))
        with pytest.raises(DistributedError, match=r"^tensor-parallel rank 1 exited with code -9; the other ranks "
                                                   r"were stopped$"):
            while engine.has_unfinished_requests():
                engine.step()
    finally:
        shutdown(engine.model)
    assert ranks.stopped
