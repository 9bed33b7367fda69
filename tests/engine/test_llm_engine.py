"""LLMEngine.step's hook for the server: before_forward runs once per step that runs the model, inside the
forward right before its layers: in a step of the one-call native decode right before it, after every torch op
(each of which releases the GIL to a thread woken by the hook)."""

from strata.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.sampling_params import SamplingParams
from strata.models import native_decode


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
