"""The mock provider answers `tools` with a tool call whose arguments satisfy the tool's schema
(SPEC 5), so tool-using clients (instructor's default mode, LangChain bind_tools, agents) work
on the demo: the argument builder in detail, then the demo sidecar through the OpenAI SDK."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import jsonschema_rs
import openai
import pytest
from aiohttp import web
from pydantic import BaseModel, Field

from sidecar.providers.mock_arguments import example_arguments
from tests.procs import SidecarProcess
from tests.support import module_sidecar, sdk
from tests.upstreams.server import ThreadedServer

DEMO = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"


class Color(StrEnum):
    RED = "red"
    BLUE = "blue"


class Address(BaseModel):
    street: str = Field(min_length=12)
    zip_code: str = Field(max_length=5)
    country: Literal["FR", "DE"]


class Person(BaseModel):
    """What instructor sends as a tool's parameters."""

    name: str
    age: int = Field(ge=18, le=130)
    height_m: float = Field(gt=0.5, lt=2.5)
    email: str = Field(json_schema_extra={"format": "email"})
    favourite: Color
    nickname: str | None = None
    addresses: list[Address] = Field(min_length=2)
    tags: set[str] = Field(default_factory=set)
    partner: Person | None = None


SCHEMAS: dict[str, dict[str, Any]] = {
    "pydantic model with $defs, enums, optionals, recursion": Person.model_json_schema(),
    "OpenAI's get_weather example": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "City and country"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location", "unit"],
        "additionalProperties": False,
    },
    "no parameters": {},
    "empty object": {"type": "object", "properties": {}},
    "const, default, examples": {
        "type": "object",
        "properties": {
            "a": {"const": 7},
            "b": {"type": "string", "default": "dflt"},
            "c": {"type": "integer", "examples": [42]},
        },
        "required": ["a", "b", "c"],
    },
    "numbers: exclusive bounds, multipleOf": {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "exclusiveMinimum": 10, "multipleOf": 5},
            "x": {"type": "number", "minimum": -3, "exclusiveMaximum": -2},
        },
        "required": ["n", "x"],
    },
    "formats": {
        "type": "object",
        "properties": {
            f: {"type": "string", "format": f} for f in ("date-time", "date", "uuid", "uri")
        },
        "required": ["date-time", "date", "uuid", "uri"],
    },
    "allOf merge and type lists": {
        "allOf": [
            {
                "type": "object",
                "properties": {"a": {"type": ["null", "string"]}},
                "required": ["a"],
            },
            {"properties": {"b": {"type": "boolean"}}, "required": ["b"]},
        ]
    },
    "arrays: prefixItems, minItems, uniqueItems": {
        "type": "object",
        "properties": {
            "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]},
            "three": {"type": "array", "items": {"type": "number"}, "minItems": 3},
            "unique": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        },
        "required": ["pair", "three", "unique"],
    },
    "minProperties takes optional ones": {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
        "minProperties": 2,
    },
}


@pytest.mark.parametrize("schema", SCHEMAS.values(), ids=SCHEMAS.keys())
def test_arguments_satisfy_the_tool_schema(schema: dict[str, Any]) -> None:
    arguments = example_arguments(schema)
    assert isinstance(arguments, dict)
    errors = [e.message for e in jsonschema_rs.validator_for(schema).iter_errors(arguments)]
    assert errors == []


def test_a_required_recursive_ref_is_cut_off_within_the_bounds() -> None:
    """A schema that requires itself forever (no valid finite value) costs a bounded walk."""
    schema = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"next": {"$ref": "#/$defs/node"}},
                "required": ["next"],
            }
        },
        "$ref": "#/$defs/node",
    }
    started = time.perf_counter()
    arguments = example_arguments(schema)
    assert time.perf_counter() - started < 0.05
    assert isinstance(arguments, dict)


def test_a_huge_schema_costs_a_bounded_walk() -> None:
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(50_000)},
            "required": [f"p{i}" for i in range(50_000)]}  # fmt: skip
    started = time.perf_counter()
    example_arguments(wide)
    assert time.perf_counter() - started < 0.2


def test_remote_refs_are_never_fetched() -> None:
    """A `$ref` to a URL is never followed: a server on loopback, named by the ref, sees no
    request, and the property still gets a value."""
    hits: list[str] = []

    def make_app() -> web.Application:
        async def schema(request: web.Request) -> web.Response:
            hits.append(request.path)
            return web.json_response({"type": "integer", "const": 42})

        app = web.Application()
        app.router.add_get("/s.json", schema)
        return app

    server = ThreadedServer(make_app).start()
    try:
        ref = server.url + "/s.json"
        schema = {"type": "object", "properties": {"a": {"$ref": ref}}, "required": ["a"]}
        arguments = example_arguments(schema)
    finally:
        server.stop()
    assert hits == []
    assert "a" in arguments and arguments["a"] != 42


# -- the demo sidecar, through the OpenAI SDK ------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    yield from module_sidecar(tmp_path_factory.mktemp("mock-tools"), DEMO.read_text())


WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": SCHEMAS["OpenAI's get_weather example"]},
}
PERSON = {
    "type": "function",
    "function": {"name": "Person", "parameters": Person.model_json_schema()},
}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


def demo_model(demo: SidecarProcess) -> str:
    return "fc:mock/echo"


def test_tools_are_answered_with_a_call_that_validates(demo: SidecarProcess) -> None:
    client = sdk(demo)
    answer = client.chat.completions.create(
        model=demo_model(demo), messages=ASK, tools=[WEATHER, PERSON]
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert jsonschema_rs.validator_for(WEATHER["function"]["parameters"]).is_valid(arguments)
    assert answer.usage is not None and answer.usage.completion_tokens > 0


def test_a_named_tool_choice_calls_that_tool(demo: SidecarProcess) -> None:
    answer = sdk(demo).chat.completions.create(
        model=demo_model(demo),
        messages=ASK,
        tools=[WEATHER, PERSON],
        tool_choice={"type": "function", "function": {"name": "Person"}},
    )
    call = answer.choices[0].message.tool_calls[0]
    assert call.function.name == "Person"
    Person.model_validate_json(call.function.arguments)  # what instructor does with it


def test_tool_choice_none_gets_a_reply(demo: SidecarProcess) -> None:
    answer = sdk(demo).chat.completions.create(
        model=demo_model(demo), messages=ASK, tools=[WEATHER], tool_choice="none"
    )
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content


def test_a_tool_result_gets_a_reply_so_the_agent_loop_ends(demo: SidecarProcess) -> None:
    client = sdk(demo)
    model = demo_model(demo)
    first = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER])
    call = first.choices[0].message.tool_calls[0]
    messages: list[Any] = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 18}'},
    ]
    second = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER])
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content
    required = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER], tool_choice="required"
    )
    assert required.choices[0].message.tool_calls is not None


def test_a_streamed_tool_call_arrives_whole(demo: SidecarProcess) -> None:
    stream = sdk(demo).chat.completions.create(
        model=demo_model(demo),
        messages=ASK,
        tools=[WEATHER],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    calls = [
        c for chunk in chunks if chunk.choices for c in chunk.choices[0].delta.tool_calls or []
    ]
    assert [c.function.name for c in calls if c.function and c.function.name] == ["get_weather"]
    arguments = json.loads("".join(c.function.arguments or "" for c in calls if c.function))
    assert set(arguments) == {"location", "unit"}
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] == "tool_calls"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_the_sdk_parse_helper_works_on_the_demo(demo: SidecarProcess) -> None:
    """`client.chat.completions.parse(..., tools=[pydantic_function_tool(...)])`: the SDK's own
    strict-tool path parses the mock's arguments into the model."""
    answer = sdk(demo).chat.completions.parse(
        model=demo_model(demo),
        messages=ASK,
        tools=[openai.pydantic_function_tool(Address)],
        tool_choice="required",
    )
    parsed = answer.choices[0].message.tool_calls[0].function.parsed_arguments
    assert isinstance(parsed, Address)
