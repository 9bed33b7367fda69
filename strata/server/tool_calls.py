"""A choice's text -> OpenAI's assistant message with `tool_calls`, whole or as stream deltas.

Streaming follows OpenAI's shape: content deltas until the tool section starts, then per call a first delta
with `index`, `id`, `type` and `function.name` (arguments ""), then `function.arguments` fragments. The
fragments are the growing raw JSON of the arguments, so they reassemble to the non-streamed call.
"""

from __future__ import annotations

import json

from strata.server.protocol import random_id
from strata.server.tool_parsers import ToolParser


def template_messages(messages) -> list[dict]:
    """Request messages -> chat-template dicts: assistant `tool_calls` with their arguments as objects (as HF
    templates expect them) and the `tool_call_id` of tool turns."""
    out = []
    for m in messages:
        d = {"role": m.role, "content": m.text()}
        if m.name:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                try:
                    args = json.loads(c.function.arguments)
                except json.JSONDecodeError:
                    args = c.function.arguments
                calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                                          "arguments": args}})
            d["tool_calls"] = calls
        out.append(d)
    return out


def tool_message(parser: ToolParser, text: str) -> tuple[dict, bool]:
    """(the assistant message, whether it calls tools) of a finished choice."""
    content, calls = parser.parse(text, final=True)
    if not calls:
        return {"role": "assistant", "content": text}, False
    return {"role": "assistant", "content": content or None,
            "tool_calls": [{"id": random_id("call_"), "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}, True


class ToolCallStreamer:
    """One streamed choice: turns its text so far into the deltas not sent yet.

    Work per chunk is bounded by the unfinished call, not the whole text: once the tool section has started,
    complete calls are kept and the scan resumes after the last of them (the final chunk parses the whole text
    once, so an unfinished call still turns into content as in the non-streamed message)."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.num_content_sent = 0
        self.args_sent: list[int] = []  # per call announced: characters of arguments sent
        self.section: tuple[str, int] | None = None  # (content before the tool section, scan resume index)
        self.done: list = []  # calls that ended before the resume index

    @property
    def has_calls(self) -> bool:
        return bool(self.args_sent)

    def _parse(self, text: str, final: bool) -> tuple[str, list]:
        if final or not self.parser.incremental:
            return self.parser.parse(text, final)
        if self.section is None:
            start, content_end = self.parser.section_start(text, False)
            if start is None:
                return text[:content_end], []
            self.section = (text[:content_end], start)
        content, resume = self.section
        calls, ended, end = self.parser.scan_calls(text, resume)
        self.done.extend(calls[:ended])
        self.section = (content, end)
        return content, self.done + calls[ended:]

    def deltas(self, text: str, final: bool) -> list[dict]:
        content, calls = self._parse(text, final)
        out = []
        if self.has_calls:  # once calls were announced, the rest of the text belongs to them
            content = content[: self.num_content_sent]
        if len(content) > self.num_content_sent:
            out.append({"content": content[self.num_content_sent :]})
            self.num_content_sent = len(content)
        for k, call in enumerate(calls):
            if call.name is None:
                break
            if k == len(self.args_sent):
                out.append({"tool_calls": [{"index": k, "id": random_id("call_"), "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]})
                self.args_sent.append(0)
            args = call.arguments or ""
            if len(args) > self.args_sent[k]:
                out.append({"tool_calls": [{"index": k, "function": {"arguments": args[self.args_sent[k] :]}}]})
                self.args_sent[k] = len(args)
        return out
