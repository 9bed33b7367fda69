"""--distributed-executor-backend ray: the worker rank as a Ray actor gives one process's greedy output, and an
actor that dies ends the next step with the one-line error (slow marker: Ray starts a local cluster)."""

import pytest

from strata.distributed.launcher import shutdown
from tests.distributed.conftest import greedy, kill_rank_1_then_step, make_engine
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
    try:
        assert greedy(engine) == want
    except BaseException:
        shutdown(engine.model)
        raise
    kill_rank_1_then_step(engine)
