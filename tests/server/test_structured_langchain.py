"""LangChain against `strata serve` (slow: `pytest -m slow tests/server/test_structured_langchain.py`):
`with_structured_output` in both of its methods and a `bind_tools` round trip (call, tool message, answer)."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from tests.server.test_structured import tool_server  # noqa: F401 - the module's server fixture

pytestmark = pytest.mark.slow
langchain_openai = pytest.importorskip("langchain_openai")


class Character(BaseModel):
    """A character of the play."""

    name: str = Field(max_length=20)
    house: str = Field(pattern="^(Montague|Capulet)$")
    age: int = Field(ge=0, le=99)


class get_weather(BaseModel):
    """Weather of a city."""

    city: str = Field(max_length=16)  # bounded: the near-random bundled model would not close a string
    unit: Literal["c", "f"]


@pytest.fixture(scope="module")
def chat(tool_server):  # noqa: F811
    return langchain_openai.ChatOpenAI(base_url=tool_server.url + "/v1", api_key="none", model="tiny",
                                       max_tokens=200, temperature=0.7, max_retries=0)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(chat, method):
    structured = chat.with_structured_output(Character, method=method)
    for _ in range(3):
        c = structured.invoke("Who is Romeo?")
        assert isinstance(c, Character) and c.house in ("Montague", "Capulet")


def test_bind_tools_round_trip(chat):
    from langchain_core.messages import HumanMessage, ToolMessage

    bound = chat.bind_tools([get_weather], tool_choice="get_weather")
    messages = [HumanMessage("What is the weather in Verona?")]
    ai = bound.invoke(messages)
    assert len(ai.tool_calls) == 1 and ai.tool_calls[0]["name"] == "get_weather"
    args = ai.tool_calls[0]["args"]
    assert set(args) == {"city", "unit"}
    streamed = None
    for chunk in bound.stream(messages):  # LangChain reassembles the streamed deltas itself
        streamed = chunk if streamed is None else streamed + chunk
    assert [tc["name"] for tc in streamed.tool_calls] == ["get_weather"]
    assert isinstance(json.dumps(streamed.tool_calls[0]["args"]), str)
    weather = get_weather(**args)
    messages += [ai, ToolMessage(f"Sunny in {weather.city}, 24 {weather.unit}", tool_call_id=ai.tool_calls[0]["id"])]
    answer = chat.bind_tools([get_weather]).invoke(messages)  # tool_choice auto: the hermes parser reads it
    assert answer.content or answer.tool_calls


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory):
    from tests.server.conftest import Server
    from tests.server.smollm2 import build_smollm2_folder

    folder = build_smollm2_folder(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")
    srv = Server(folder, "--served-model-name", "smollm2", "--tool-call-parser", "hermes",
                 "--enable-auto-tool-choice", "--max-model-len", "2048")
    yield srv
    srv.stop()


def test_real_model_structured_and_tools(smollm2_server):
    """SmolLM2-135M-Instruct (49,152-token vocabulary, its own weights): structured output and a tool round trip."""
    from langchain_core.messages import HumanMessage, ToolMessage

    chat = langchain_openai.ChatOpenAI(base_url=smollm2_server.url + "/v1", api_key="none", model="smollm2",
                                       max_tokens=120, temperature=0, max_retries=0)
    c = chat.with_structured_output(Character, method="json_schema").invoke("Describe Romeo as JSON.")
    assert isinstance(c, Character) and c.house in ("Montague", "Capulet")
    messages = [HumanMessage("What is the weather in Verona, in c?")]
    ai = chat.bind_tools([get_weather], tool_choice="get_weather").invoke(messages)
    assert [tc["name"] for tc in ai.tool_calls] == ["get_weather"]
    weather = get_weather(**ai.tool_calls[0]["args"])
    messages += [ai, ToolMessage(f"Sunny in {weather.city}, 24 {weather.unit}", tool_call_id=ai.tool_calls[0]["id"])]
    answer = chat.bind_tools([get_weather]).invoke(messages)
    assert answer.content or answer.tool_calls
