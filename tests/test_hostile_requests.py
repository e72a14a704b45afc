"""Requests no SDK sends, answered in the OpenAI envelope and never with a 500: JSON nested too
deeply, parameters of the wrong JSON type, bodies not declared as JSON."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from sidecar.api import common
from sidecar.errors import GatewayError
from sidecar.providers.mock import _prompt_text
from tests.conftest import openai_config
from tests.procs import SidecarProcess
from tests.support import CHAT, HELLO, Answer, module_sidecar, post_chat
from tests.upstreams.openai_fake import FakeOpenAI

MINI = "fc:openai/gpt-4o-mini"
ECHO = "fc:mock/echo"
LIMIT = 64  # the documented nesting limit (README, "Failure modes")


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    config = openai_config(_openai_server.url)
    config["providers"]["mock"] = {"kind": "mock"}
    config["models"][ECHO] = {"input_per_mtok": 0.1, "output_per_mtok": 0.1, "context": 128000}
    yield from module_sidecar(tmp_path_factory.mktemp("hostile"), config)


def nested(levels: int) -> Any:
    """A JSON value `levels` arrays deep."""
    value: Any = "core"
    for _ in range(levels):
        value = [value]
    return value


# -- nesting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [LIMIT, 300, 1000])  # body depth: levels + 1
def test_json_nested_past_the_limit_is_400_naming_it(
    levels: int, gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    """300 and 1,000 levels parse (orjson reads 1,024) but could not be re-encoded for the
    upstream (orjson writes 254): refused before anything else, as any depth past the limit."""
    deep = b"[" * levels + b'"core"' + b"]" * levels  # 1,000 levels: too deep for json.dumps
    body = b'{"model": "%s", "messages": %s, "extra": %s}' % (
        MINI.encode(),
        orjson.dumps(HELLO),
        deep,
    )
    answer = post_chat(gateway, body)
    assert answer.status == 400, answer.body
    assert answer.error["code"] == "invalid_request"
    assert f"more than {LIMIT} levels" in answer.error["message"]
    assert fake_openai.received == []


def test_json_nested_to_the_limit_reaches_the_upstream_intact(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    deep = nested(LIMIT - 1)
    answer = post_chat(gateway, {"model": MINI, "messages": HELLO, "extra": deep})
    assert answer.status == 200, answer.body
    assert fake_openai.received[0].body["extra"] == deep


@pytest.mark.parametrize("depth", [LIMIT, LIMIT + 1])
def test_a_large_body_is_checked_for_depth_too(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, depth: int
) -> None:
    """A body past the bracket-counting size (and past aiohttp's first read): same limit."""
    padding = "x" * 100_000
    answer = post_chat(
        gateway,
        {"model": MINI, "messages": HELLO, "pad": padding, "extra": nested(depth - 1)},
    )
    if depth > LIMIT:
        assert answer.status == 400, answer.body
        assert f"more than {LIMIT} levels" in answer.error["message"]
        assert fake_openai.received == []
    else:
        assert answer.status == 200, answer.body
        assert fake_openai.received[0].body["extra"] == nested(depth - 1)


def test_a_response_format_schema_nested_past_the_limit_is_400(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    """Checking a schema this deep ran the JSON Schema checker out of stack: a 500."""
    schema: dict[str, Any] = {}
    for _ in range(150):
        schema = {"items": schema}
    response_format = {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}
    answer = post_chat(
        gateway, {"model": MINI, "messages": HELLO, "response_format": response_format}
    )
    assert answer.status == 400, answer.body
    assert f"more than {LIMIT} levels" in answer.error["message"]


@pytest.mark.parametrize("padding", [0, 10_000], ids=["small-body", "large-body"])
def test_the_limit_is_exact_for_small_and_large_bodies(padding: int) -> None:
    """Small bodies are checked after counting brackets, large ones at once: same answer."""

    def body(depth: int) -> bytes:
        return orjson.dumps({"pad": "x" * padding, "deep": nested(depth - 1)})

    assert common.parse_json_object(body(LIMIT))["pad"] == "x" * padding
    with pytest.raises(GatewayError) as refused:
        common.parse_json_object(body(LIMIT + 1))
    assert refused.value.status == 400
    assert refused.value.param is None


def test_objects_count_as_levels_like_arrays() -> None:
    deep: Any = 1
    for _ in range(LIMIT + 1):
        deep = {"a": deep}
    with pytest.raises(GatewayError):
        common.parse_json_object(orjson.dumps(deep))
    common.parse_json_object(orjson.dumps(deep["a"]))


def test_orjson_writes_254_levels_and_no_more() -> None:
    """What the depth check stands on: if orjson's limit moves, the check must move with it."""
    orjson.dumps(nested(253))  # 253 arrays around a string: 254 levels with the ...
    orjson.dumps(nested(254))  # ... string counted, as orjson counts the containers only
    with pytest.raises(orjson.JSONEncodeError, match="Recursion limit"):
        orjson.dumps(nested(255))


# -- parameters of the wrong JSON type ----------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": [{"role": ["user"], "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": {"name": "user"}, "content": "hi"}]}, "messages[0].role"),
        ({"response_format": {"type": {"name": "json_object"}}}, "response_format"),
        ({"response_format": {"type": ["json_object"]}}, "response_format"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "messages[0].content[0].text",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]},
            "messages[0].content[0].text",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0].text",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].image_url",
        ),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "refusal", "refusal": 1}]}]},
            "messages[0].content[0].refusal",
        ),
    ],
)
def test_a_parameter_of_the_wrong_type_is_400_naming_it(
    fields: dict[str, Any], param: str, gateway: SidecarProcess
) -> None:
    """Sent to the mock, the model that reached deepest before: these were 500s."""
    answer = post_chat(gateway, {"model": ECHO, "messages": HELLO, **fields})
    assert answer.status == 400, answer.body
    assert answer.error["code"] == "invalid_request"
    assert answer.error["param"] == param


def test_a_content_part_type_the_api_does_not_define_passes_through(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    part = {"type": "future_part", "future_part": {"x": 1}}
    messages = [{"role": "user", "content": [part]}]
    answer = post_chat(gateway, {"model": MINI, "messages": messages})
    assert answer.status == 200, answer.body
    assert fake_openai.received[0].body["messages"] == messages


def test_the_mock_counts_only_text_that_is_a_string() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": 5}, {"text": "ok"}]}]
    assert _prompt_text(messages) == "ok"


# -- the body's declared type -------------------------------------------------------------------


def post_declared(proc: SidecarProcess, headers: dict[str, str]) -> Answer:
    """A chat request with exactly these headers (http.client adds none but Content-Length)."""
    body = orjson.dumps({"model": ECHO, "messages": HELLO})
    conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=15)
    try:
        conn.request("POST", CHAT, body=body, headers=headers)
        response = conn.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        conn.close()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Content-Type": "application/json"},
        {"Content-Type": "application/json; charset=utf-8"},
        {"Content-Type": "Application/JSON"},
        {"Content-Type": "application/vnd.api+json"},
        {"Content-Type": "application/json", "Origin": "https://app.example"},
    ],
    ids=["undeclared", "json", "json-charset", "json-upper-case", "plus-json", "json-from-a-page"],
)
def test_a_body_declared_as_json_or_undeclared_is_read(
    headers: dict[str, str], gateway: SidecarProcess
) -> None:
    answer = post_declared(gateway, headers)
    assert answer.status == 200, answer.body


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "text/plain"},
        {"Content-Type": "text/plain;charset=UTF-8"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "multipart/form-data; boundary=x"},
        {"Content-Type": "application/xml"},
        {"Origin": "https://evil.example"},
    ],
    ids=["text", "text-charset", "form", "multipart", "xml", "undeclared-from-a-page"],
)
def test_a_body_declared_as_something_else_is_415(
    headers: dict[str, str], gateway: SidecarProcess
) -> None:
    """The types (and the undeclared body) a web page may send cross-site without a CORS
    preflight: no page can make a visitor's browser call a sidecar in open mode."""
    answer = post_declared(gateway, headers)
    assert answer.status == 415, answer.body
    assert answer.error["code"] == "unsupported_media_type"
    assert answer.error["type"] == "invalid_request_error"
    assert "Content-Type: application/json" in answer.error["message"]
