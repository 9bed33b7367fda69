"""Tool-call parsers: whole replies, and streamed deltas that reassemble to the non-streamed call."""

from __future__ import annotations

import json

import pytest

from strata.errors import ConfigError
from strata.server.tool_calls import ToolCallStreamer, template_messages, tool_message
from strata.server.tool_parsers import NamedToolParser, RequiredToolParser, get_tool_parser

ARGS1 = {"city": "Paris, \"the\" {city}", "days": [1, 2], "unit": "c"}
ARGS2 = {"query": "a}b]c\\", "n": 3}

REPLIES = {
    "hermes": ((f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {json.dumps(ARGS1)}}}\n'
               f'</tool_call>\n<tool_call>\n{{"name": "search", "arguments": {json.dumps(ARGS2)}}}\n</tool_call>'),
               "Let me check.\n"),
    "llama3_json": ((f'{{"name": "get_weather", "parameters": {json.dumps(ARGS1)}}}; '
                    f'{{"name": "search", "parameters": {json.dumps(ARGS2)}}}'), None),
    "mistral": ((f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {json.dumps(ARGS1)}}}, '
                f'{{"name": "search", "arguments": {json.dumps(ARGS2)}}}]'), None),
}


def _stream(parser, text: str, step: int = 1) -> tuple[str, list[dict]]:
    """Feed the text in growing prefixes; reassemble content and calls from the deltas as a client does."""
    streamer = ToolCallStreamer(parser)
    content, calls = "", []
    cuts = list(range(step, len(text), step)) + [len(text)]
    for i, end in enumerate(cuts):
        for d in streamer.deltas(text[:end], final=i == len(cuts) - 1):
            content += d.get("content", "")
            for tc in d.get("tool_calls", []):
                if tc["index"] == len(calls):
                    assert set(tc) == {"index", "id", "type", "function"} and tc["function"]["arguments"] == ""
                    calls.append({"name": tc["function"]["name"], "arguments": ""})
                else:
                    assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                    calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    return content, calls


@pytest.mark.parametrize("name", sorted(REPLIES))
def test_whole_reply(name):
    text, content = REPLIES[name]
    msg, called = tool_message(get_tool_parser(name), text)
    assert called and msg["content"] == content
    calls = msg["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "search"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [ARGS1, ARGS2]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)


@pytest.mark.parametrize("step", [1, 3, 7])
@pytest.mark.parametrize("name", sorted(REPLIES))
def test_streamed_deltas_reassemble(name, step):
    text, content = REPLIES[name]
    msg, _ = tool_message(get_tool_parser(name), text)
    got_content, got_calls = _stream(get_tool_parser(name), text, step)
    assert got_content == (content or "")
    assert got_calls == [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                         for c in msg["tool_calls"]]


@pytest.mark.parametrize("name", sorted(REPLIES))
def test_plain_text_is_content(name):
    text = "To be, or not to be: that is the question. {not a call}"
    msg, called = tool_message(get_tool_parser(name), text)
    assert not called and msg == {"role": "assistant", "content": text}
    content, calls = _stream(get_tool_parser(name), text, 2)
    assert content == text and calls == []


def test_marker_prefix_held_back_then_released():
    streamer = ToolCallStreamer(get_tool_parser("hermes"))
    assert streamer.deltas("Hello <tool_", final=False) == [{"content": "Hello "}]
    assert streamer.deltas("Hello <tool_x", final=True) == [{"content": "<tool_x"}]


def test_unfinished_call_is_content():
    text = '<tool_call>{"name": "f", "arguments": {"a": '
    msg, called = tool_message(get_tool_parser("hermes"), text)
    assert not called and msg["content"] == text


def test_arguments_as_json_string_and_missing():
    msg, _ = tool_message(get_tool_parser("hermes"),
                          '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
                          '<tool_call>{"name": "g"}</tool_call>')
    assert [c["function"]["arguments"] for c in msg["tool_calls"]] == ['{"a": 1}', "{}"]


def test_required_and_named():
    text = '[{"name": "f", "parameters": {"x": 1}}, {"name": "g", "parameters": {}}]'
    msg, _ = tool_message(RequiredToolParser(), text)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == \
        [("f", '{"x": 1}'), ("g", "{}")]
    assert _stream(RequiredToolParser(), text, 4)[1] == [{"name": "f", "arguments": '{"x": 1}'},
                                                         {"name": "g", "arguments": "{}"}]
    msg, _ = tool_message(NamedToolParser("f"), '{"x": [1, 2]}')
    assert msg["content"] is None and msg["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": [1, 2]}'}
    assert _stream(NamedToolParser("f"), '{"x": [1, 2]}', 5)[1] == [{"name": "f", "arguments": '{"x": [1, 2]}'}]


def test_unknown_parser():
    with pytest.raises(ConfigError, match="unknown parser 'nope'.*hermes"):
        get_tool_parser("nope")


def test_template_messages_parse_arguments():
    from strata.server.protocol import ChatMessage

    msgs = [ChatMessage(role="assistant", content=None, tool_calls=[
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]),
        ChatMessage(role="tool", content="42", tool_call_id="call_1")]
    out = template_messages(msgs)
    assert out[0] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}
    assert out[1] == {"role": "tool", "content": "42", "tool_call_id": "call_1"}


def test_arguments_before_name_still_reassemble():
    text = '<tool_call>{"arguments": {"a": [1, {"b": "}"}]}, "name": "f"}</tool_call>'
    msg, _ = tool_message(get_tool_parser("hermes"), text)
    assert msg["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": [1, {"b": "}"}]}'}
    assert _stream(get_tool_parser("hermes"), text, 1)[1] == [{"name": "f", "arguments": '{"a": [1, {"b": "}"}]}'}]


def test_stream_scan_resumes_after_ended_calls(monkeypatch):
    """Per chunk, the streamer scans from the last ended call, not from the start of the text: many calls streamed
    token by token cost about as much scanning as the text is long (not its square)."""
    import strata.server.tool_parsers as tp

    one = '<tool_call>{"name": "f", "arguments": {"x": "' + "y" * 40 + '"}}</tool_call>'
    text = "ok " + one * 30
    scanned = []
    real = tp.scan_call

    def counting(t, i, keys):
        call, end = real(t, i, keys)
        scanned.append((end if end is not None else len(t)) - i)
        return call, end

    monkeypatch.setattr(tp, "scan_call", counting)
    content, calls = _stream(get_tool_parser("hermes"), text, step=2)
    assert content == "ok " and len(calls) == 30 and all(json.loads(c["arguments"]) == {"x": "y" * 40} for c in calls)
    per_call = len(one)
    # each chunk rescans at most the unfinished call; the final chunk parses the whole text once
    assert sum(scanned) < 2 * len(text) + (len(text) // 2) * per_call
    assert sum(scanned) < len(text) * len(text) // 40
