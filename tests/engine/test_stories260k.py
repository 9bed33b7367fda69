"""The real stories260K model (converted from llama2.c) against run.c's published outputs."""

import json

import pytest

from strata import LLM, SamplingParams
from tests.conftest import STORIES260K

GREEDY = ["greedy_noprompt_n256", "greedy_noprompt_n200", "greedy_once_upon_a_time_n64"]


@pytest.fixture(scope="module")
def stories_llm(stories260k_hf):
    return LLM(str(stories260k_hf), progress=False, max_num_seqs=4)


@pytest.fixture(scope="module")
def cases():
    return json.loads((STORIES260K / "reference_outputs.json").read_text())["cases"]


@pytest.mark.parametrize("name", GREEDY)
def test_greedy_matches_published_run_c_output(stories_llm, cases, name):
    case = cases[name]
    prompt_ids = stories_llm.tokenizer.encode(case["prompt"])
    assert prompt_ids == case["derived_prompt_token_ids"]
    # run.c's -n counts positions; it prints steps+1 ids counting BOS, i.e. steps+1-len(prompt) new tokens
    n_new = case["steps"] + 1 - len(prompt_ids)
    out = stories_llm.generate([case["prompt"]], SamplingParams(temperature=0, max_tokens=n_new))[0]
    seq = prompt_ids + out.outputs[0].token_ids
    assert seq == case["derived_sequence_token_ids"]
    text = stories_llm.tokenizer.decode(seq)
    assert text == case["text"]


def test_batched_equals_sequential_greedy(stories_llm):
    prompts = ["Once upon a time", "The cat", "Lily and Tom went", "One day, a big dog"]
    params = SamplingParams(temperature=0, max_tokens=40)
    batched = [o.outputs[0].token_ids for o in stories_llm.generate(prompts, params)]
    one_by_one = [stories_llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert batched == one_by_one


def test_seed_reproduces_and_differs(stories_llm):
    def run(seed):
        p = SamplingParams(temperature=1.0, top_p=0.9, seed=seed, max_tokens=30)
        return stories_llm.generate(["Once upon a time"], p)[0].outputs[0].token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)
    # the same seeded request gives the same tokens when batched with others
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=30)
    other = SamplingParams(temperature=1.0, seed=3, max_tokens=30)
    outs = stories_llm.generate(["The cat", "Once upon a time"], [other, p])
    assert outs[1].outputs[0].token_ids == run(7)


def test_stop_string_stops_and_is_cut(stories_llm):
    params = SamplingParams(temperature=0, max_tokens=100, stop=["park"])
    out = stories_llm.generate(["Once upon a time"], params)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "park"
    assert "park" not in out.text and out.text.endswith("in the ")


def test_stop_token_and_max_tokens(stories_llm):
    out = stories_llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=5))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    first = out.token_ids[2]
    out2 = stories_llm.generate(["Once upon a time"],
                                SamplingParams(temperature=0, max_tokens=50, stop_token_ids=[first]))[0].outputs[0]
    assert out2.finish_reason == "stop" and out2.token_ids[-1] == first and len(out2.token_ids) == 3


def test_stream_concatenates_to_full_text(stories_llm):
    params = SamplingParams(temperature=0, max_tokens=60)
    full = stories_llm.generate(["Once upon a time"], params)[0].outputs[0].text
    assert "".join(stories_llm.stream("Once upon a time", params)) == full
