"""Request fields -> the engine's StructuredOutputsParams, and the tool-call mode of a chat request.

Sources, at most one per request: OpenAI's `response_format` (json_object, json_schema), vLLM's `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` and `structured_outputs`, and `tool_choice` `required` or a
named function, which are enforced the way vLLM does it: a named function's output is its arguments, shaped by
its `parameters` schema; `required` outputs a JSON array of `{"name", "parameters"}` objects.
"""

from __future__ import annotations

from strata.engine.guided import compile_grammar
from strata.engine.sampling_params import StructuredOutputsParams
from strata.errors import InvalidRequestError
from strata.server.errors import APIError
from strata.server.tool_parsers import NamedToolParser, RequiredToolParser, ToolParser, get_tool_parser

ANY_OBJECT = {"type": "object"}
MAX_TOOL_CALLS = 8  # calls in one forced reply: a weak model would otherwise add calls until max_tokens


def _parameters(tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def required_schema(tools, parallel: bool = True) -> dict:
    """A JSON array of one or more calls of the given tools (exactly one without parallel calls)."""
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                               "parameters": _parameters(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    return {"type": "array", "minItems": 1, "maxItems": MAX_TOOL_CALLS if parallel else 1,
            "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}


def tool_mode(req, parser_name: str | None, enable_auto: bool) -> tuple[ToolParser | None, tuple | None]:
    """(parser of the output or None, (param, StructuredOutputsParams) the tool choice enforces or None)."""
    tools = getattr(req, "tools", None)
    choice = getattr(req, "tool_choice", None)
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        return None, None
    if choice == "none":
        return None, None
    if choice == "required":
        parallel = getattr(req, "parallel_tool_calls", None) is not False
        return RequiredToolParser(), ("tool_choice", StructuredOutputsParams(json=required_schema(tools, parallel)))
    if choice is not None and choice != "auto":
        named = {t.function.name: t for t in tools}
        tool = named.get(choice.function.name)
        if tool is None:
            raise APIError(400, f"tool_choice names function {choice.function.name!r}, which is not among the "
                                f"tools ({', '.join(named)})", "tool_choice")
        return NamedToolParser(tool.function.name), ("tool_choice", StructuredOutputsParams(json=_parameters(tool)))
    if not (enable_auto and parser_name):
        raise APIError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                       "tool_choice")
    return get_tool_parser(parser_name), None


def _sources(req) -> list[tuple[str, StructuredOutputsParams]]:
    out = []
    ws = req.guided_whitespace_pattern
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        out.append(("response_format", StructuredOutputsParams(json=ANY_OBJECT)))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise APIError(400, "response_format.json_schema.schema is required for type json_schema",
                           "response_format.json_schema")
        out.append(("response_format.json_schema.schema", StructuredOutputsParams(json=rf.json_schema.schema_)))
    for field, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                        ("guided_grammar", "grammar")):
        if getattr(req, field) is not None:
            out.append((field, StructuredOutputsParams(**{kind: getattr(req, field)}, whitespace_pattern=ws)))
    so = req.structured_outputs
    if so is not None:
        try:
            out.append(("structured_outputs", StructuredOutputsParams(
                json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar, json_object=so.json_object,
                whitespace_pattern=so.whitespace_pattern)))
        except InvalidRequestError as e:
            raise APIError(400, str(e), "structured_outputs") from None
    return out


def structured_source(req, enforced: tuple | None) -> tuple[str, StructuredOutputsParams] | None:
    """The request's one constraint as (its field, its params), or None; 400 when it gives more than one."""
    sources = _sources(req) + ([enforced] if enforced else [])
    if not sources:
        return None
    if len(sources) > 1:
        raise APIError(400, f"give at most one structured output constraint, got {', '.join(p for p, _ in sources)}",
                       sources[1][0])
    return sources[0]


def checked_params(param: str, params: StructuredOutputsParams) -> StructuredOutputsParams:
    """params, once its grammar compiles (the costly part: a server runs it off the event loop); 400 naming the
    field otherwise."""
    try:
        compile_grammar(params)
    except InvalidRequestError as e:
        reason = str(e).split(": ", 1)[-1]
        raise APIError(400, f"{param}: {reason}", param) from None
    return params
