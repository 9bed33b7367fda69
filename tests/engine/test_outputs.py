"""Deferred outputs (LLMEngine.defer_detokenization): resolved once each and in step order, they equal field for
field what the step would have built at once (text, deltas, token ids, finish and stop reasons, logprobs, prompt
logprobs), whether resolved right after their step or long after; consecutive ones resolved as one equal them
joined with RequestOutput.add; requests with stop strings keep being detokenized in the step; a deferred
request's exported detokenizer is the one its consumer holds."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from strata.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.migration import export_request, import_request
from strata.engine.outputs import DeferredOutput, RequestOutput, resolve_run
from strata.engine.sampling_params import SamplingParams
from tests.server.tiny_model import build_tiny_server_model

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_server_model(tmp_path_factory.mktemp("outputs") / "m")


def _engine(model, deferred: bool) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=str(model), max_num_seqs=8, num_threads=1), progress=False)
    if deferred:
        engine.defer_detokenization()
    return engine


def _requests(engine: LLMEngine) -> dict[str, SamplingParams]:
    """Greedy, sampled with logprobs (random weights: byte tokens that split UTF-8 characters), n > 1, prompt
    logprobs, stop token ids, min_tokens with EOS, and a stop string (detokenized in the step)."""
    reqs = {
        "greedy": SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        "sampled": SamplingParams(temperature=1.0, seed=3, max_tokens=30, logprobs=2, ignore_eos=True),
        "n2": SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=20, ignore_eos=True),
        "prompt_lp": SamplingParams(temperature=0.8, seed=7, max_tokens=12, prompt_logprobs=1, logprobs=0),
        "stop_ids": SamplingParams(temperature=1.0, seed=9, max_tokens=40, stop_token_ids=[100, 101, 102, 103]),
        "min_tokens": SamplingParams(temperature=1.0, seed=11, max_tokens=40, min_tokens=5),
        "stop_str": SamplingParams(temperature=1.0, seed=13, max_tokens=40, stop=["e", "a"], logprobs=1),
    }
    for rid, params in reqs.items():
        engine.add_request(PROMPT, params, request_id=rid)
    return reqs


def _fields(out: RequestOutput) -> dict:
    d = dataclasses.asdict(out)
    d["metrics"] = {k: v is not None for k, v in d["metrics"].items()}  # times differ between two engines
    return d


def _run(engine: LLMEngine) -> list[list]:
    steps = []
    while engine.has_unfinished_requests():
        steps.append(engine.step())
    return steps


def test_deferred_outputs_resolve_to_the_outputs_built_in_the_step(model):
    eager, deferred = _engine(model, False), _engine(model, True)
    _requests(eager), _requests(deferred)
    want, got = _run(eager), _run(deferred)
    assert len(want) == len(got)
    kinds = {}
    for w_step, g_step in zip(want, got):
        assert all(type(o) is RequestOutput for o in w_step)
        for g in g_step:
            kinds.setdefault(g.request_id, set()).add(type(g))
        assert [_fields(w) for w in w_step] == [_fields(g.resolve()) for g in g_step]
    assert kinds["stop_str"] == {RequestOutput}  # stop strings need the text inside the step
    assert all(k == {DeferredOutput} for rid, k in kinds.items() if rid != "stop_str")
    finals = {o.request_id: o for step in want for o in step if o.finished}
    assert finals["stop_ids"].outputs[0].finish_reason == "stop"  # the cases really ran
    assert finals["stop_str"].outputs[0].stop_reason in ("e", "a")
    texts = [o.text for out in finals.values() for o in out.outputs]
    assert any(ord(c) > 127 and c != "\ufffd" for t in texts for c in t)  # a character split over byte tokens


def test_outputs_resolved_long_after_their_step_are_the_same(model):
    eager, deferred = _engine(model, False), _engine(model, True)
    _requests(eager), _requests(deferred)
    want = [_fields(o) for step in _run(eager) for o in step]
    pending = [o for step in _run(deferred) for o in step]  # the engine ran to the end before any is resolved
    assert [_fields(o.resolve()) for o in pending] == want


@pytest.mark.parametrize("run_len", [2, 3, 7])
def test_consecutive_outputs_resolved_as_one_equal_them_joined(model, run_len):
    eager, deferred = _engine(model, False), _engine(model, True)
    _requests(eager), _requests(deferred)
    want, got = {}, {}
    for out in (o for step in _run(eager) for o in step):
        want.setdefault(out.request_id, []).append(out)
    for out in (o for step in _run(deferred) for o in step):
        got.setdefault(out.request_id, []).append(out)
    for rid, outs in got.items():
        if type(outs[0]) is not DeferredOutput:
            continue
        for start in range(0, len(outs), run_len):
            run, ref = outs[start:start + run_len], want[rid][start:start + run_len]
            joined = ref[0]
            for later in ref[1:]:
                joined = joined.add(later)
            assert _fields(resolve_run(run)) == _fields(joined)
    assert sum(type(outs[0]) is DeferredOutput for outs in got.values()) == len(got) - 1  # all but stop_str


def test_the_counts_a_server_reads_before_resolving(model):
    deferred = _engine(model, True)
    _requests(deferred)
    for step in _run(deferred):
        for out in step:
            num, finished, reasons = out.num_generated_tokens, out.finished, out.finish_reasons
            res = out.resolve()
            assert (num, finished, reasons) == (res.num_generated_tokens, res.finished, res.finish_reasons)
            assert out.prompt_token_ids == res.prompt_token_ids


def test_export_of_a_deferred_request_carries_its_consumers_detokenizer(model):
    params = SamplingParams(temperature=1.0, seed=21, max_tokens=40, ignore_eos=True)
    eager, deferred = _engine(model, False), _engine(model, True)
    texts = {}
    for name, engine in (("eager", eager), ("deferred", deferred)):
        engine.add_request(PROMPT, params, request_id="r")
        text = ""
        for _ in range(17):
            for out in engine.step():
                text += out.resolve().outputs[0].delta
        migrated = export_request(engine, "r")
        state = copy.deepcopy(migrated.detokenizer)  # the target goes on with (and changes) its lists
        target = _engine(model, name == "deferred")
        import_request(target, migrated, "r")
        for step in _run(target):
            for out in step:
                text += out.resolve().outputs[0].delta
        texts[name] = (text, state)
    assert texts["deferred"] == texts["eager"]


def test_deferred_outputs_with_speculative_decoding(model):
    """Several tokens per step (accepted drafts) reach the detokenizer in one resolve."""
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    engines = []
    for deferred in (False, True):
        engine = LLMEngine(EngineConfig(model=str(model), max_num_seqs=4, num_threads=1, speculative_config=spec),
                           progress=False)
        if deferred:
            engine.defer_detokenization()
        engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), request_id="g")
        engines.append(engine)
    want = [_fields(o) for step in _run(engines[0]) for o in step]
    got = [_fields(o.resolve()) for step in _run(engines[1]) for o in step]
    assert got == want
    assert engines[1].spec.num_accepted_tokens > 0
    assert len(want) < 40  # some steps brought more than one token
