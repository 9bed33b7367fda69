"""LLMEngine.step's hook for the server: before_forward runs once per step that runs the model, inside the
forward right before its layers: in a step of the one-call native decode right before it, after every torch op
(each of which releases the GIL to a thread woken by the hook)."""

import pytest

from strata.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.sampling_params import SamplingParams
from strata.models import native_decode


@pytest.mark.skipif(native_decode.bf16_lib() is None, reason="native kernels unavailable on this machine")
def test_before_forward_runs_once_per_forward_right_before_its_native_code(monkeypatch):
    engine = LLMEngine(EngineConfig(num_threads=1), progress=False)
    calls = []
    execute = engine.runner.execute
    engine.runner.execute = lambda *a, **k: (calls.append("forward"), execute(*a, **k), calls.append("end"))[1]
    lib = native_decode.bf16_lib()

    class Traced:
        def __getattr__(self, name):
            return getattr(lib, name)

        def decode_layers(self, *args):
            calls.append("native")
            return lib.decode_layers(*args)

    monkeypatch.setattr(native_decode, "bf16_lib", Traced)
    engine.before_forward = lambda: calls.append("hook")
    engine.add_request("ROMEO:", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    num_steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        num_steps += 1
    # each step is one native call, the prompt's too (the bundled model is a MoE model)
    assert calls == ["forward", "hook", "native", "end"] * 5 and num_steps == 5


def _greedy_tokens(engine, prompt="ROMEO:", n=6):
    engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = out.outputs[0].token_ids
    return tokens


def test_warm_up_runs_prompt_lengths_and_leaves_the_engine_as_it_was():
    expected = _greedy_tokens(LLMEngine(EngineConfig(num_threads=1, max_model_len=200), progress=False))
    assert len(expected) == 6
    engine = LLMEngine(EngineConfig(num_threads=1, max_model_len=200), progress=False)
    free, stats = engine.num_free_kv_blocks(), engine.get_stats()
    assert engine.runner.warm_up(200, budget_s=60) == [65, 129, 193]  # each multiple of 64 rows once, + 1
    assert engine.runner.warm_up(100, budget_s=-1) == []  # a spent budget: no forward
    engine.warm_up()
    assert engine.num_free_kv_blocks() == free and engine.get_stats() == stats
    assert _greedy_tokens(engine) == expected
    engine.runner.warm_up = lambda *a: pytest.fail("warm-up after a step would overwrite K/V in use")
    engine.warm_up()
