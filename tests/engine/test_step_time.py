"""The TPOT target (--max-tpot-ms): StepTimeModel learns step time against batch size from decode steps, the
scheduler admits no more sequences than it allows (queueing the rest, never dropping them), and the engine
feeds it pure decode steps only. Step times are synthetic (a fake step-time function), never measured."""

from __future__ import annotations

import os

import pytest

from strata.config import EngineConfig
from strata.engine.block_manager import BlockManager
from strata.engine.llm_engine import BUNDLED_MODEL, LLMEngine
from strata.engine.sampling_params import SamplingParams
from strata.engine.scheduler import Scheduler
from strata.engine.sequence import Sequence, SequenceStatus
from strata.engine.step_time import STALE_AFTER_STEPS, StepTimeModel
from strata.errors import ConfigError


def _linear(n: int) -> float:
    """A fake decode step: 1 ms plus 1 ms per sequence."""
    return 0.001 + 0.001 * n


def test_limit_grows_from_one_measured_size_at_a_time():
    m = StepTimeModel(target_s=0.0045, max_num_seqs=16)
    assert m.seq_limit() == 1  # nothing measured
    m.observe(1, _linear(1))
    assert m.seq_limit() == 2  # one size within the target: one more
    m.observe(2, _linear(2))
    assert m.seq_limit() == 3  # the line 1 ms + 1 ms/seq reaches 4.5 ms at 3.5 sequences
    assert m.predict(10) == pytest.approx(_linear(10))


def test_limit_follows_the_line_and_max_num_seqs():
    m = StepTimeModel(target_s=0.0105, max_num_seqs=16)
    for n in (1, 2, 4):
        m.observe(n, _linear(n))
    assert m.seq_limit() == 9
    assert StepTimeModel(target_s=1.0, max_num_seqs=4).seq_limit() == 1
    loose = StepTimeModel(target_s=1.0, max_num_seqs=4)
    loose.observe(1, _linear(1))
    loose.observe(2, _linear(2))
    assert loose.seq_limit() == 4  # capped by max_num_seqs


def test_a_size_measured_over_the_target_is_not_run_again():
    m = StepTimeModel(target_s=0.0045, max_num_seqs=16)
    m.observe(1, 0.001)
    m.observe(2, 0.0015)
    m.observe(3, 0.009)  # the line alone would allow more
    assert m.seq_limit() == 2


def test_a_slow_spell_is_forgotten():
    m = StepTimeModel(target_s=0.0045, max_num_seqs=16)
    for n in (1, 2, 3):
        m.observe(n, _linear(n))
    assert m.seq_limit() == 3
    m.observe(3, 0.05)  # one step ten times too slow
    assert m.seq_limit() == 1
    for _ in range(STALE_AFTER_STEPS + 1):  # only one sequence runs meanwhile, at its usual speed
        m.observe(1, _linear(1))
    assert sorted(m.avg_s) == [1] and m.seq_limit() == 2  # the slow sizes forgotten: growing again
    m.observe(2, _linear(2))
    assert m.seq_limit() == 3


def test_flat_or_falling_line_grows_one_at_a_time():
    m = StepTimeModel(target_s=0.005, max_num_seqs=16)
    m.observe(1, 0.003)
    m.observe(2, 0.002)  # noise: a negative slope
    assert m.seq_limit() == 3


def test_moving_average_follows_a_slower_machine():
    m = StepTimeModel(target_s=0.0045, max_num_seqs=16)
    m.observe(1, _linear(1))
    m.observe(2, _linear(2))
    assert m.seq_limit() == 3
    for _ in range(30):  # the machine became 3x slower
        m.observe(1, 3 * _linear(1))
        m.observe(2, 3 * _linear(2))
    assert m.seq_limit() == 1


class _FakeStepTime:
    """The scheduler only asks for seq_limit(); a test sets it."""

    def __init__(self, limit: int):
        self.limit = limit

    def seq_limit(self) -> int:
        return self.limit


def _seqs(k: int) -> list[Sequence]:
    return [Sequence(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True)) for i in range(k)]


def test_scheduler_admits_up_to_the_limit_and_queues_the_rest():
    fake = _FakeStepTime(2)
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=256, step_time=fake)
    seqs = _seqs(6)
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == seqs[:2] and len(sched.waiting) == 4 and sched.seq_limit == 2
    fake.limit = 4
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        s.token_ids.append(1)
    assert sched.schedule().seqs == seqs[:4]
    fake.limit = 1  # a limit that shrank: the running sequences go on, nobody new comes in
    for s in seqs[:4]:
        s.num_computed_tokens = s.num_tokens
        s.token_ids.append(1)
    assert sched.schedule().seqs == seqs[:4] and len(sched.waiting) == 2
    for s in seqs[:4]:
        sched.finish(s)
    assert sched.schedule().seqs == seqs[4:5]  # under the limit again: one admitted
    assert all(s.status != SequenceStatus.FINISHED for s in seqs[4:])  # queued, never dropped


def test_scheduler_without_a_target_uses_max_num_seqs():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=3, max_num_batched_tokens=256)
    for s in _seqs(5):
        sched.add(s)
    assert len(sched.schedule().seqs) == 3 and sched.seq_limit == 3


def test_max_tpot_ms_must_be_positive():
    with pytest.raises(ConfigError, match="--max-tpot-ms"):
        EngineConfig(max_tpot_ms=0)


@pytest.mark.skipif(not os.path.exists(os.path.join(BUNDLED_MODEL, "model.safetensors")),
                    reason="bundled model not present")
def test_engine_honours_the_tpot_target():
    engine = LLMEngine(EngineConfig(max_num_seqs=8, max_tpot_ms=4.5), progress=False)
    model = engine.scheduler.step_time
    decode_sizes = []
    real_observe = model.observe

    def synthetic(num_seqs: int, seconds: float) -> None:  # the measured time replaced by the fake step
        decode_sizes.append(num_seqs)
        real_observe(num_seqs, _linear(num_seqs))

    model.observe = synthetic
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    rids = [engine.add_request(f"ROMEO {i}:", params) for i in range(10)]
    finished = {}
    num_running = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        num_running.append(len(engine.running_request_ids()))
    assert max(decode_sizes) == 3 and max(num_running) == 3  # 1 ms + 1 ms x 3 is the most within 4.5 ms
    assert 3 in decode_sizes and engine.num_free_seq_slots() == 3  # the limit reached, and admission's view of it
    assert sorted(finished) == sorted(rids)  # every request served, none dropped
    assert all(len(out.outputs[0].token_ids) == 10 for out in finished.values())
