"""LLMEngine.step's hook for the server: before_forward runs once per step that runs the model, right before it."""

from strata.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.sampling_params import SamplingParams


def test_before_forward_runs_right_before_each_forward():
    engine = LLMEngine(EngineConfig(num_threads=1), progress=False)
    calls = []
    execute = engine.runner.execute
    engine.runner.execute = lambda *a, **k: (calls.append("forward"), execute(*a, **k))[1]
    engine.before_forward = lambda: calls.append("hook")
    engine.add_request("ROMEO:", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    num_steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        num_steps += 1
    assert calls == ["hook", "forward"] * num_steps and num_steps == 5
