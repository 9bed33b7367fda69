"""Tool-call parsers (vLLM's `--tool-call-parser` names): model text -> (content, tool calls), whole or as it
streams.

Every format is a marker that opens the tool section, then JSON objects with a name key and an arguments key:
  hermes       `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen 2.5/3)
  llama3_json  `{"name": ..., "parameters": {...}}` as the whole reply (optionally after `<|python_tag|>`),
               several separated by `;`
  mistral      `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`
One scanner reads them all, also from a text that stops mid-call: a call's arguments are the raw JSON text the
model wrote, so the fragments streamed as they grow concatenate to the non-streamed arguments exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from strata.errors import ConfigError

_WS = " \t\n\r"


@dataclass
class ParsedCall:
    name: str | None  # None until the name's string is complete
    arguments: str | None  # JSON text so far (complete when `complete`); None until it can only grow
    complete: bool


def _skip_ws(t: str, i: int) -> int:
    while i < len(t) and t[i] in _WS:
        i += 1
    return i


def value_end(t: str, i: int) -> int | None:
    """End (exclusive) of the JSON value that starts at t[i]; None when the text ends first."""
    if i >= len(t):
        return None
    if t[i] == '"':
        j = i + 1
        while j < len(t):
            if t[j] == "\\":
                j += 2
                continue
            if t[j] == '"':
                return j + 1
            j += 1
        return None
    if t[i] in "{[":
        depth, in_str, j = 0, False, i
        while j < len(t):
            ch = t[j]
            if in_str:
                if ch == "\\":
                    j += 1
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(t) and t[j] not in ",}] \t\n\r":
        j += 1
    return j if j < len(t) else None


def scan_call(t: str, i: int, arg_keys: tuple[str, ...]) -> tuple[ParsedCall, int | None]:
    """The call object at t[i] == '{' -> (call so far, end index or None while incomplete or malformed)."""
    name, args, j = None, None, i + 1
    while True:
        j = _skip_ws(t, j)
        if j >= len(t):
            return ParsedCall(name, args, False), None
        if t[j] == "}":
            return ParsedCall(name, "{}" if args is None else args, name is not None), j + 1
        if t[j] == ",":
            j += 1
            continue
        kend = value_end(t, j) if t[j] == '"' else -1
        if kend is None or kend == -1:
            return ParsedCall(name, args, False), None
        key = json.loads(t[j:kend])
        j = _skip_ws(t, kend)
        if j >= len(t) or t[j] != ":":
            return ParsedCall(name, args, False), None
        j = _skip_ws(t, j + 1)
        vend = value_end(t, j)
        if key == "name" and vend is not None and t[j] == '"':
            name = json.loads(t[j:vend])
        elif key in arg_keys and j < len(t):
            if t[j] in "{[":  # raw JSON text: it only grows, so partial text is a prefix of the final one
                args = t[j:vend] if vend is not None else t[j:]
            elif vend is not None and t[j] == '"':  # arguments given as a JSON string
                args = json.loads(t[j:vend])
        if vend is None:
            return ParsedCall(name, args, False), None
        j = vend


class ToolParser:
    """Base: find where the tool section starts, then read successive call objects."""

    name = ""
    marker = ""  # the text that opens the tool section
    arg_keys: tuple[str, ...] = ("arguments", "parameters")
    needs_special_tokens = False  # the marker is a special token, so detokenization must keep it

    def section_start(self, text: str, final: bool) -> tuple[int | None, int]:
        """(index of the first call's text, or None; length of the content that is certainly not a marker)."""
        k = text.find(self.marker)
        if k != -1:
            return k + len(self.marker), k
        if final:
            return None, len(text)
        for n in range(min(len(self.marker) - 1, len(text)), 0, -1):  # keep back a marker's beginning
            if self.marker.startswith(text[-n:]):
                return None, len(text) - n
        return None, len(text)

    incremental = True  # a stream may resume scanning after the calls already complete (ToolCallStreamer)

    def scan_calls(self, text: str, i: int) -> tuple[list[ParsedCall], int, int]:
        """Call objects from text[i:] (the ended ones, then at most one unfinished), the number that ended, and the
        index after the last ended one (where a later scan of the grown text may resume)."""
        calls, resume = [], i
        while True:
            i = text.find("{", i)
            if i == -1:
                return calls, len(calls), resume
            call, end = scan_call(text, i, self.arg_keys)
            calls.append(call)
            if end is None:
                return calls, len(calls) - 1, resume
            i = resume = end

    def parse(self, text: str, final: bool = False) -> tuple[str, list[ParsedCall]]:
        """(content, calls) of the text so far; with final, an unfinished call turns it all into content."""
        start, content_end = self.section_start(text, final)
        content = text[:content_end]
        if start is None:
            return content, []
        calls, _, _ = self.scan_calls(text, start)
        if final and (not calls or not all(c.complete for c in calls)):
            return text, []
        return content, calls


class HermesToolParser(ToolParser):
    name = "hermes"
    marker = "<tool_call>"


class MistralToolParser(ToolParser):
    name = "mistral"
    marker = "[TOOL_CALLS]"
    needs_special_tokens = True


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    marker = "<|python_tag|>"

    def section_start(self, text: str, final: bool) -> tuple[int | None, int]:
        i = _skip_ws(text, 0)
        if text.startswith(self.marker, i):
            return i + len(self.marker), i
        if i < len(text) and text[i] == "{":
            return i, i
        if i == len(text) or (not final and self.marker.startswith(text[i:])):
            return None, 0 if not final else len(text)
        return None, len(text)


class RequiredToolParser(ToolParser):
    """tool_choice=required: the output is the JSON array that structured outputs enforced."""

    name = "required"
    arg_keys = ("parameters",)

    def section_start(self, text: str, final: bool) -> tuple[int | None, int]:
        return 0, 0


class NamedToolParser(ToolParser):
    """tool_choice naming a function: the whole output is its arguments (enforced by its parameters' schema)."""

    incremental = False

    def __init__(self, function: str):
        self.function = function

    def parse(self, text: str, final: bool = False) -> tuple[str, list[ParsedCall]]:
        return "", [ParsedCall(self.function, text, final)]


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ConfigError(f"--tool-call-parser: unknown parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}")
    return TOOL_PARSERS[name]()
