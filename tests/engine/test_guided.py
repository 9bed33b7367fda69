"""Structured outputs in the engine, on the bundled model (its near-random Shakespeare makes validity mean
something): every output of a suite of schemas parses and validates, greedy and sampled, batched."""

from __future__ import annotations

import json
import re

import pytest
import torch

from strata.engine.guided import closed_objects, compile_grammar, unpack_bitmask
from strata.engine.sampling_params import SamplingParams, StructuredOutputsParams
from strata.errors import InvalidRequestError

jsonschema = pytest.importorskip("jsonschema")

# Bounded where a random model could otherwise go on forever (string lengths, digits, array sizes).
NAME = {"type": "string", "maxLength": 16}
SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
             "required": ["name", "age"]},
    "enum+pattern+optional": {"type": "object", "properties": {
        "mood": {"enum": ["happy", "sad", "angry"]},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "ok": {"type": "boolean"},
        "note": NAME},
        "required": ["mood", "code"]},
    "nested+arrays": {"type": "object", "properties": {
        "play": NAME,
        "acts": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object", "properties": {
            "number": {"type": "integer", "minimum": 1, "maximum": 5},
            "scenes": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 2}},
            "required": ["number", "scenes"]}},
        "meta": {"type": "object", "properties": {"tragic": {"type": "boolean"}, "year": {"type": "integer",
                                                                                         "maximum": 1700}}}},
        "required": ["play", "acts"]},
    "anyOf+const+null": {"type": "object", "properties": {
        "kind": {"const": "scene"},
        "value": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": -10, "maximum": 10}]}},
        "required": ["kind", "value"]},
    "array root": {"type": "array", "minItems": 2, "maxItems": 4, "items": {"enum": ["ROMEO", "JULIET", 3]}},
}


@pytest.fixture(scope="module")
def llm():
    from strata import LLM

    return LLM(progress=False)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_schema_suite_batched(llm, temperature):
    prompts = ["ROMEO:", "JULIET: O", "First Citizen:\nBefore we proceed", "KING HENRY"]
    params, expect = [], []
    for schema in SCHEMAS.values():
        for i, _ in enumerate(prompts):
            params.append(SamplingParams(temperature=temperature, seed=i, max_tokens=300,
                                         structured_outputs=StructuredOutputsParams(json=schema)))
            expect.append(schema)
    outs = llm.generate(prompts * len(SCHEMAS), params)  # all in one continuous batch
    for out, schema in zip(outs, expect):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (c.text, c.finish_reason)
        jsonschema.validate(json.loads(c.text), schema)


def test_n_sequences_have_their_own_matchers(llm):
    out = llm.generate("ROMEO:", SamplingParams(temperature=1.0, seed=3, n=4, max_tokens=300, structured_outputs=
                                                StructuredOutputsParams(json=SCHEMAS["nested+arrays"])))[0]
    texts = [c.text for c in out.outputs]
    assert len(set(texts)) > 1
    for t in texts:
        jsonschema.validate(json.loads(t), SCHEMAS["nested+arrays"])


def test_regex_choice_grammar_json_object(llm):
    def run(**kw):
        p = SamplingParams(temperature=1.0, seed=0, max_tokens=60, structured_outputs=StructuredOutputsParams(**kw))
        return [c.text for c in llm.generate(["ROMEO:", "JULIET:", "KING:"], p) for c in c.outputs]

    assert all(re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{3}", t) for t in run(regex=r"[A-Z][a-z]{2,8} [0-9]{3}"))
    assert set(run(choice=["yes", "no", "perhaps"])) <= {"yes", "no", "perhaps"}
    got = run(grammar='root ::= "to " verb (" or not to " verb)?\nverb ::= "be" | "see"')
    assert all(re.fullmatch(r"to (be|see)( or not to (be|see))?", t) for t in got)
    assert all(isinstance(json.loads(t), dict) for t in run(json_object=True))


def test_overlapped_mask_matches_inline(llm):
    eng = llm.engine
    p = SamplingParams(temperature=0.0, max_tokens=200, structured_outputs=StructuredOutputsParams(
        json=SCHEMAS["nested+arrays"]))
    eng.structured.overlap = True
    a = [o.outputs[0].text for o in llm.generate(["ROMEO:", "JULIET:"], p)]
    eng.structured.overlap = False
    try:
        b = [o.outputs[0].text for o in llm.generate(["ROMEO:", "JULIET:"], p)]
    finally:
        eng.structured.overlap = True
    assert a == b


def test_eos_only_where_the_grammar_accepts(llm):
    eng = llm.engine
    rid = eng.add_request("ROMEO:", SamplingParams(temperature=0.0, max_tokens=50, structured_outputs=
                                                   StructuredOutputsParams(json=SCHEMAS["flat"])))
    seq = eng._requests[rid][0]
    logits = torch.zeros(1, eng.model_config.vocab_size)
    eos = eng.eos_token_ids
    masked = eng.structured.apply(logits, [seq])
    assert torch.isinf(masked[0, eos]).all()  # nothing generated yet: no EOS
    for tok in eng.tokenizer.encode('{"name": "Tybalt", "age": 3', add_special_tokens=False):
        assert eng.structured.accept(seq, tok)
    masked = eng.structured.apply(logits, [seq])
    assert torch.isinf(masked[0, eos]).all()  # the object is open
    assert not torch.isinf(masked[0, eng.tokenizer.encode("}", add_special_tokens=False)]).any()
    eng.abort_request(rid)
    assert seq.seq_id not in eng.structured.matchers


@pytest.mark.parametrize("params, match", [
    (StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "foo"}}}), "json: .*foo"),
    (StructuredOutputsParams(json="{not json"), "json: the schema is not valid JSON"),
    (StructuredOutputsParams(json="[1]"), "a JSON schema must be an object"),
    (StructuredOutputsParams(regex="[a-"), "regex: .*unclosed character class"),
    (StructuredOutputsParams(grammar="root ::= ("), "grammar: "),
])
def test_bad_constraints_are_one_line_errors(params, match):
    with pytest.raises(InvalidRequestError, match=match) as e:
        compile_grammar(params)
    assert "\n" not in str(e.value)


def test_sampling_params_take_a_dict():
    p = SamplingParams(structured_outputs={"choice": ["a", "b"]})
    assert p.structured_outputs == StructuredOutputsParams(choice=["a", "b"])


def test_exactly_one_constraint():
    with pytest.raises(InvalidRequestError, match="exactly one of"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(InvalidRequestError, match="exactly one of"):
        StructuredOutputsParams()


def test_unpack_bitmask():
    allowed = torch.rand(3, 70) > 0.5  # [N, V]
    padded = torch.zeros(3, 96, dtype=torch.bool)
    padded[:, :70] = allowed
    weights = 2 ** torch.arange(32, dtype=torch.int64)
    words = (padded.view(3, 3, 32).long() * weights).sum(-1)  # [N, W] as unsigned 32-bit values
    mask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).numpy()
    assert torch.equal(torch.from_numpy(unpack_bitmask(mask, 70)).bool(), allowed)


def test_closed_objects_only_touches_schemas():
    schema = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"x": {}}}},
              "$defs": {"d": {"properties": {"y": {}}, "additionalProperties": True}},
              "anyOf": [{"properties": {}}]}
    out = closed_objects(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["properties"]["additionalProperties"] is False
    assert set(out["properties"]) == {"properties"}
    assert out["$defs"]["d"]["additionalProperties"] is True
    assert out["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is untouched
