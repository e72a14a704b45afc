"""POST /v1/responses (SPEC 2.6) through a real sidecar with the official SDK: translated onto
the chat call of a provider without the native Responses API (an OpenAI-compatible kind in front
of the fake's chat endpoint, and the mock), stream and not, with a function tool round trip,
`text.format` json_schema and its re-prompt, usage, cost, budget and usage records; server-side
state refused where the API is not native; errors in the envelope."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.conftest import PROVIDER_KEY, openai_config
from tests.openai_schemas import check_event, check_response
from tests.procs import SidecarProcess, wait_until
from tests.support import (
    metric_samples,
    module_sidecar,
    request,
    sdk,
    start_sidecar,
    without_circuit_breakers,
)
from tests.upstreams.openai_fake import FakeOpenAI, Reply

TRANSLATED = "fc:compat/llama-3.1-8b"  # an OpenAI-compatible kind without the native API
ADMIN = "admin-token-for-responses"
EVENTS = TypeAdapter(ResponseStreamEvent)
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
CITY_FORMAT = {
    "type": "json_schema",
    "name": "city",
    "schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    config = without_circuit_breakers(openai_config(_openai_server.url))
    config["providers"]["compat"] = {
        "kind": "vllm",
        "base_url": _openai_server.url,
        "api_key_env": "TEST_OPENAI_KEY",
    }
    config["providers"]["mock"] = {
        "kind": "mock",
        "mock": {
            "models": {
                "json-learner": {
                    "contents": ["Sure! Paris", '{"city": "Paris", "country": "France"}']
                },
                "flaky": {"fail_status": 503},
            }
        },
    }
    config["models"].update(
        {
            TRANSLATED: {"input_per_mtok": 1.0, "output_per_mtok": 2.0, "max_output": 4096},
            "fc:mock/echo": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
            "fc:mock/json-learner": {"input_per_mtok": 0.3, "output_per_mtok": 1.2},
            "fc:mock/flaky": {"input_per_mtok": 0.1, "output_per_mtok": 0.4},
        }
    )
    config["slots"] = {"chat": ["fc:mock/flaky", "fc:mock/echo"]}
    config["customers"] = {"acme": {"budget": {"usd": 1.0, "period": "day"}}}
    config["admin"] = {"token": ADMIN}
    yield from module_sidecar(tmp_path_factory.mktemp("responses"), config)


def post(gateway: SidecarProcess, body: dict[str, Any], **headers: str) -> Any:
    return request(gateway.url, "POST", "/v1/responses", body, headers)


def events_of(body: bytes, openapi: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each SSE event, every data validated as the SDK's event type and
    (`openapi`: for events the sidecar made, not a native provider's) OpenAI's schema."""
    found = []
    for block in body.decode().split("\n\n"):
        lines = block.splitlines()
        names = [line[6:].strip() for line in lines if line.startswith("event:")]
        data = [line[5:].strip() for line in lines if line.startswith("data:")]
        if not data:
            continue
        event = json.loads("\n".join(data))
        EVENTS.validate_python(event)
        if openapi:
            check_event(event)
        assert names == [event["type"]], (names, event)
        found.append((event["type"], event))
    assert [e["sequence_number"] for _, e in found] == list(range(len(found)))
    return found


# -- translated, not streamed ---------------------------------------------------------------------


def test_create_on_a_translated_provider(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Reply(content="Bonjour!", prompt_tokens=20, completion_tokens=5))
    raw = sdk(gateway).responses.with_raw_response.create(
        model=TRANSLATED,
        instructions="Answer in French.",
        input="Say hello",
        max_output_tokens=50,
        temperature=0.2,
        metadata={"ticket": "42"},
    )
    answer = raw.parse()
    Response.model_validate(json.loads(raw.content))
    check_response(json.loads(raw.content))
    assert answer.output_text == "Bonjour!"
    assert answer.object == "response" and answer.id.startswith("resp_")
    assert answer.status == "completed"
    assert answer.model == "llama-3.1-8b"
    assert answer.instructions == "Answer in French."
    assert answer.metadata == {"ticket": "42"}
    assert answer.usage is not None
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (20, 5)
    assert answer.usage.total_tokens == 25
    assert raw.headers["X-Ringside-Model-Used"] == TRANSLATED
    assert raw.headers["X-Ringside-Cost-USD"] == "0.00003"  # 20 × $1/M + 5 × $2/M
    sent = fake_openai.received[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.body == {
        "model": "llama-3.1-8b",
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Say hello"},
        ],
        "temperature": 0.2,
        "max_completion_tokens": 50,
    }


def test_input_items_become_messages(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    sdk(gateway).responses.create(
        model=TRANSLATED,
        input=[
            {"role": "developer", "content": "Be brief."},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": "https://example.com/a.png"},
                ],
            },
            {"role": "assistant", "content": [{"type": "output_text", "text": "A cat."}]},
            {"role": "user", "content": "Sure?"},
        ],
    )
    assert fake_openai.received[0].body["messages"] == [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ],
        },
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]


def test_function_tool_round_trip(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    """A function_call comes back as an output item; sent back with its function_call_output
    in the next request, it reaches the provider as the chat turn of a tool call and its result."""
    function = {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    call = {"id": "call_1", "type": "function", "function": function}
    fake_openai.script(Reply(tool_calls=[call], finish_reason="tool_calls"))
    client = sdk(gateway)
    first = client.responses.create(
        model=TRANSLATED,
        input="Weather in Paris?",
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="required",
    )
    assert first.status == "completed"
    [item] = first.output
    assert item.type == "function_call"
    assert (item.call_id, item.name) == ("call_1", "get_weather")
    assert item.arguments == '{"city":"Paris"}'
    assert item.id is not None and item.id.startswith("fc_")
    sent = fake_openai.received[0].body
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": WEATHER_TOOL["parameters"],
                "strict": True,
            },
        }
    ]
    assert sent["tool_choice"] == "required"

    fake_openai.script(Reply(content="It is sunny in Paris."))
    second = client.responses.create(
        model=TRANSLATED,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            item.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"type": "function_call_output", "call_id": "call_1", "output": '{"sky":"sunny"}'},
        ],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    assert second.output_text == "It is sunny in Paris."
    assert fake_openai.received[1].body["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky":"sunny"}'},
    ]


def test_json_schema_is_enforced_with_a_reprompt(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(
        Reply(content='{"city": "Paris"}'),
        Reply(content='{"city": "Paris", "country": "France"}'),
    )
    raw = sdk(gateway).responses.with_raw_response.create(
        model=TRANSLATED,
        input="Where is the Eiffel tower?",
        text={"format": CITY_FORMAT},  # type: ignore[typeddict-item]
    )
    answer = raw.parse()
    assert json.loads(answer.output_text) == {"city": "Paris", "country": "France"}
    assert answer.text is not None and answer.text.format is not None
    assert answer.text.format.type == "json_schema"
    assert raw.headers["X-Ringside-Schema-Reprompts"] == "1"
    first, second = (r.body for r in fake_openai.received)
    assert first["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": CITY_FORMAT["schema"], "strict": True},
    }
    assert "does not match the required JSON Schema" in second["messages"][-1]["content"]


def test_json_schema_never_met_is_a_422_naming_text_format(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(*[Reply(content="not json")] * 3)
    answer = post(gateway, {"model": TRANSLATED, "input": "x", "text": {"format": CITY_FORMAT}})
    assert answer.status == 422
    assert answer.error["code"] == "response_schema_validation_failed"
    assert answer.error["param"] == "text.format"


def test_a_length_finish_is_incomplete(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Reply(content="Once upon", finish_reason="length"))
    answer = sdk(gateway).responses.create(model=TRANSLATED, input="story", max_output_tokens=2)
    assert answer.status == "incomplete"
    assert answer.incomplete_details is not None
    assert answer.incomplete_details.reason == "max_output_tokens"
    assert answer.output_text == "Once upon"


def test_the_mock_answers_the_demo_call(gateway: SidecarProcess) -> None:
    answer = sdk(gateway).responses.create(model="fc:mock/echo", input="hi")
    assert answer.output_text == "Hello from the Ringside mock provider."


def test_the_mock_answers_function_tools_with_a_call(gateway: SidecarProcess) -> None:
    answer = sdk(gateway).responses.create(
        model="fc:mock/echo",
        input="Weather?",
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    [item] = answer.output
    assert item.type == "function_call" and item.name == "get_weather"
    assert set(json.loads(item.arguments)) == {"city"}


def test_a_cascade_escalates(gateway: SidecarProcess) -> None:
    raw = sdk(gateway).responses.with_raw_response.create(model="slot:chat", input="hi")
    assert raw.parse().output_text == "Hello from the Ringside mock provider."
    assert raw.headers["X-Ringside-Models-Tried"] == "fc:mock/flaky,fc:mock/echo"
    assert raw.headers["X-Ringside-Fallback-Triggered"] == "true"


def test_the_mock_json_learner_is_reprompted(gateway: SidecarProcess) -> None:
    answer = sdk(gateway).responses.create(
        model="fc:mock/json-learner",
        input="city?",
        text={"format": CITY_FORMAT},  # type: ignore[typeddict-item]
    )
    assert json.loads(answer.output_text) == {"city": "Paris", "country": "France"}


def test_cost_budget_and_usage_record(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Reply(prompt_tokens=10_000, completion_tokens=2_000))
    raw = sdk(gateway).responses.with_raw_response.create(
        model=TRANSLATED, input="hi", extra_headers={"FC-Customer": "acme"}
    )
    assert raw.headers["X-Ringside-Cost-USD"] == "0.014"  # 10k × $1/M + 2k × $2/M
    assert float(raw.headers["X-Ringside-Budget-Remaining-USD"]) == pytest.approx(0.986)
    # the budget's worst case was sent as the output cap (the catalog's max_output)
    assert fake_openai.received[0].body["max_completion_tokens"] == 4096
    usage = request(
        gateway.admin_url,
        "GET",
        "/v1/customers/acme/usage",
        headers={"Authorization": f"Bearer {ADMIN}"},
    ).json()
    assert usage["tokens"]["input"] >= 10_000
    assert usage["tokens"]["output"] >= 2_000
    samples = metric_samples(gateway)
    assert any(
        name == "ringside_tokens_total" and dict(labels).get("model") == TRANSLATED and value > 0
        for (name, labels), value in samples.items()
    )


# -- refusals and errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0]",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ],
)
def test_server_side_state_is_refused_where_not_native(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, extra: dict[str, Any], param: str
) -> None:
    answer = post(gateway, {"model": TRANSLATED, "input": "hi", **extra})
    assert answer.status == 400, answer.body
    assert answer.error["code"] == "invalid_request"
    assert answer.error["param"] == param
    assert "native Responses API" in answer.error["message"]
    assert fake_openai.received == []


def test_the_sdk_raises_the_refusal(gateway: SidecarProcess) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gateway).responses.create(
            model="fc:mock/echo", input="more", previous_response_id="resp_1"
        )
    assert "previous_response_id" in str(caught.value)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "hi"}, "model"),
        ({"model": TRANSLATED}, "input"),
        ({"model": TRANSLATED, "input": 3}, "input"),
        ({"model": TRANSLATED, "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"model": TRANSLATED, "input": "x", "instructions": 1}, "instructions"),
        ({"model": TRANSLATED, "input": "x", "temperature": 3}, "temperature"),
        ({"model": TRANSLATED, "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": TRANSLATED, "input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
        ({"model": TRANSLATED, "input": "x", "tool_choice": 5}, "tool_choice"),
        ({"model": TRANSLATED, "input": "x", "text": {"format": {"type": "xml"}}}, "text.format"),
        (
            {"model": TRANSLATED, "input": "x", "text": {"format": {"type": "json_schema"}}},
            "text.format.name",
        ),
        ({"model": TRANSLATED, "input": "x", "stream": "yes"}, "stream"),
        ({"model": TRANSLATED, "input": "x", "metadata": {"a": 1}}, "metadata"),
        # wrong JSON types where a string is looked up in a set (each was a 500: unhashable)
        ({"model": TRANSLATED, "input": [{"role": ["user"], "content": "x"}]}, "input[0].role"),
        ({"model": TRANSLATED, "input": [{"role": {"a": 1}, "content": "x"}]}, "input[0].role"),
        ({"model": TRANSLATED, "input": "x", "tool_choice": {"type": ["f"]}}, "tool_choice"),
        ({"model": TRANSLATED, "input": "x", "tool_choice": ["auto"]}, "tool_choice"),
        ({"model": TRANSLATED, "input": "x", "text": {"format": {"type": ["xml"]}}}, "text.format"),
        ({"model": TRANSLATED, "input": "x", "text": {"format": {"type": {}}}}, "text.format"),
        # wrong JSON types in what a translated provider does not use (was accepted: 200)
        ({"model": TRANSLATED, "input": "x", "reasoning": {"effort": 3}}, "reasoning.effort"),
        ({"model": TRANSLATED, "input": "x", "reasoning": {"summary": []}}, "reasoning.summary"),
        ({"model": TRANSLATED, "input": "x", "truncation": {"a": 1}}, "truncation"),
        ({"model": TRANSLATED, "input": "x", "include": "usage"}, "include"),
        ({"model": TRANSLATED, "input": "x", "include": [1]}, "include"),
    ],
)
def test_malformed_requests_are_400_naming_the_parameter(
    gateway: SidecarProcess, body: dict[str, Any], param: str
) -> None:
    answer = post(gateway, body)
    assert answer.status == 400
    assert answer.error["param"] == param
    assert (answer.error["code"], answer.error["type"]) == (
        "invalid_request",
        "invalid_request_error",
    )


def test_an_invalid_schema_is_a_400_naming_text_format(gateway: SidecarProcess) -> None:
    bad = {**CITY_FORMAT, "schema": {"type": "object", "properties": {"a": {"type": 5}}}}
    answer = post(gateway, {"model": TRANSLATED, "input": "x", "text": {"format": bad}})
    assert answer.status == 400
    assert answer.error["param"] == "text.format"


def test_an_upstream_failure_is_a_503_in_the_envelope(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(status=500))
    answer = post(gateway, {"model": TRANSLATED, "input": "x"})
    assert answer.status == 503
    assert answer.error["code"] == "upstream_unavailable"


# -- translated, streamed -------------------------------------------------------------------------


def test_a_translated_stream_is_rebuilt_as_responses_events(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(
        Reply(content="Hello there, friend.", chunks=4, prompt_tokens=9, completion_tokens=4)
    )
    answer = post(gateway, {"model": TRANSLATED, "input": "hi", "stream": True})
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    events = events_of(answer.body)
    names = [name for name, _ in events]
    assert names[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert names[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [e["delta"] for name, e in events if name == "response.output_text.delta"]
    assert len(deltas) == 4 and "".join(deltas) == "Hello there, friend."
    final = Response.model_validate(events[-1][1]["response"])
    assert final.output_text == "Hello there, friend."
    assert final.usage is not None and (final.usage.input_tokens, final.usage.output_tokens) == (
        9,
        4,
    )
    assert len({e["response"]["id"] for name, e in events if "response" in e}) == 1
    assert fake_openai.received[0].body["stream_options"] == {"include_usage": True}


def test_the_sdk_stream_helper_consumes_it(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content="Streamed through the helper.", chunks=3))
    with sdk(gateway).responses.stream(model=TRANSLATED, input="hi") as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == "Streamed through the helper."
    assert final.output_text == "Streamed through the helper."
    assert final.status == "completed"


def test_a_streamed_tool_call(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    function = {"name": "get_weather", "arguments": '{"city":"Oslo"}'}
    fake_openai.script(
        Reply(
            tool_calls=[{"id": "call_9", "type": "function", "function": function}],
            finish_reason="tool_calls",
        )
    )
    stream = sdk(gateway).responses.create(
        model=TRANSLATED,
        input="Weather in Oslo?",
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        stream=True,
    )
    events = list(stream)
    names = [e.type for e in events]
    assert "response.function_call_arguments.delta" in names
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == '{"city":"Oslo"}'
    final = events[-1]
    assert final.type == "response.completed"
    [item] = final.response.output
    assert item.type == "function_call" and item.call_id == "call_9"


def test_a_mid_stream_failure_ends_with_response_failed(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content="abcdefghij", chunks=5, error_after_chunks=2))
    answer = post(gateway, {"model": TRANSLATED, "input": "hi", "stream": True})
    events = events_of(answer.body)
    names = [name for name, _ in events]
    assert names[-2:] == ["error", "response.failed"]
    assert events[-2][1]["code"] == "upstream_unavailable"
    failed = Response.model_validate(events[-1][1]["response"])
    assert failed.status == "failed" and failed.error is not None
    assert failed.output_text == "abcd"  # what was produced before the failure


def test_a_failure_before_the_first_event_is_a_json_error(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(status=500))
    answer = post(gateway, {"model": TRANSLATED, "input": "hi", "stream": True})
    assert answer.status == 503
    assert answer.error["code"] == "upstream_unavailable"


def test_a_slot_cascade_streams_with_fallback(gateway: SidecarProcess) -> None:
    answer = post(gateway, {"model": "slot:chat", "input": "hi", "stream": True})
    assert answer.status == 200
    assert answer.headers["X-Ringside-Models-Tried"] == "fc:mock/flaky,fc:mock/echo"
    final = Response.model_validate(events_of(answer.body)[-1][1]["response"])
    assert final.output_text == "Hello from the Ringside mock provider."


def test_a_streamed_json_schema_is_validated_at_its_end(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    """A kind with native json_schema streams through; an answer that misses the schema ends
    with the error event and response.failed."""
    fake_openai.script(Reply(content='{"city": "Paris"}'))
    body = {"model": TRANSLATED, "input": "x", "stream": True, "text": {"format": CITY_FORMAT}}
    events = events_of(post(gateway, body).body)
    assert [name for name, _ in events][-2:] == ["error", "response.failed"]
    assert events[-2][1]["code"] == "response_schema_validation_failed"
    assert "text.format" in events[-2][1]["message"]

    fake_openai.script(Reply(content='{"city": "Paris", "country": "France"}'))
    events = events_of(post(gateway, body).body)
    assert events[-1][0] == "response.completed"


def test_a_streamed_json_schema_on_the_mock_runs_the_reprompt_loop(gateway: SidecarProcess) -> None:
    """Without native json_schema the loop runs buffered and the validated answer is streamed."""
    stream = sdk(gateway).responses.create(
        model="fc:mock/json-learner",
        input="city?",
        text={"format": CITY_FORMAT},  # type: ignore[typeddict-item]
        stream=True,
    )
    events = list(stream)
    assert events[0].type == "response.created"
    final = events[-1]
    assert final.type == "response.completed"
    assert json.loads(final.response.output_text) == {"city": "Paris", "country": "France"}


# -- native (openai, azure) -----------------------------------------------------------------------

NATIVE = "fc:openai/gpt-4o-mini"


def test_native_create_forwards_the_request_as_sent(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    """Server-side state, reasoning, built-in tools: the native API takes them all."""
    raw = sdk(gateway).responses.with_raw_response.create(
        model=NATIVE,
        input="Go on",
        instructions="Be brief.",
        previous_response_id="resp_earlier",
        store=True,
        reasoning={"effort": "low"},
        tools=[{"type": "web_search"}],
    )
    answer = raw.parse()
    Response.model_validate(json.loads(raw.content))
    assert answer.output_text == "Hello from the fake upstream."
    assert answer.id == "resp_fake"  # the provider's own object, untouched
    assert raw.headers["X-Ringside-Model-Used"] == NATIVE
    assert raw.headers["X-Ringside-Cost-USD"] == "0.00000585"  # 11 × $0.15/M + 7 × $0.60/M
    [sent] = fake_openai.received
    assert sent.path == "/v1/responses"
    assert sent.body == {
        "model": "gpt-4o-mini",
        "input": "Go on",
        "instructions": "Be brief.",
        "previous_response_id": "resp_earlier",
        "store": True,
        "reasoning": {"effort": "low"},
        "tools": [{"type": "web_search"}],
    }
    assert sent.headers["Authorization"] != "Bearer unused-in-open-mode"  # the provider's key


def test_native_stream_passes_the_events_through(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content="one two three", chunks=3))
    answer = post(gateway, {"model": NATIVE, "input": "count", "stream": True})
    events = events_of(answer.body, openapi=False)  # the fake's, passed through
    names = [name for name, _ in events]
    assert names[0] == "response.created" and names[-1] == "response.completed"
    assert names.count("response.output_text.delta") == 3
    assert events[-1][1]["response"]["id"] == "resp_fake"
    assert fake_openai.received[0].body == {
        "model": "gpt-4o-mini",
        "input": "count",
        "stream": True,
    }

    fake_openai.script(Reply(content="through the SDK"))
    with sdk(gateway).responses.stream(model=NATIVE, input="hi") as stream:
        for _event in stream:
            pass
        assert stream.get_final_response().output_text == "through the SDK"


def test_native_mid_stream_failure_ends_with_response_failed(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content="abcdefgh", chunks=4, error_after_chunks=1))
    events = events_of(
        post(gateway, {"model": NATIVE, "input": "x", "stream": True}).body, openapi=False
    )
    assert [name for name, _ in events][-2:] == ["error", "response.failed"]
    assert events[-2][1]["code"] == "upstream_unavailable"
    assert events[-1][1]["response"]["id"] == "resp_fake"  # the same response, failed


def test_native_calls_carry_the_budget_cap_and_are_billed(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    def spent() -> tuple[float, int, int]:
        usage = request(
            gateway.admin_url,
            "GET",
            "/v1/customers/acme/usage",
            headers={"Authorization": f"Bearer {ADMIN}"},
        ).json()
        return usage["spent_usd"], usage["tokens"]["input"], usage["tokens"]["output"]

    before = spent()
    fake_openai.script(Reply(prompt_tokens=1000, completion_tokens=100))
    customer = {"FC-Customer": "acme"}
    sdk(gateway).responses.create(model=NATIVE, input="hi", extra_headers=customer)
    assert fake_openai.received[0].body["max_output_tokens"] == 16384  # the catalog's max_output
    sdk(gateway).responses.create(
        model=NATIVE, input="hi", max_output_tokens=100, extra_headers=customer
    )
    assert fake_openai.received[1].body["max_output_tokens"] == 100
    fake_openai.script(Reply(prompt_tokens=500, completion_tokens=50))
    stream = post(gateway, {"model": NATIVE, "input": "x", "stream": True}, **customer)
    assert events_of(stream.body, openapi=False)[-1][0] == "response.completed"
    after = spent()
    assert after[1] - before[1] == 1000 + 11 + 500
    assert after[2] - before[2] == 100 + 7 + 50
    assert after[0] > before[0]


def test_a_background_response_is_charged_its_worst_case(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    """`background: true` is answered `queued`, without usage, before it runs: the provider
    bills it when it ends, after the request's hold is settled, so the budget is charged the
    worst case the hold covered (every request byte a token, the whole output cap sent)."""
    before = acme_usage(gateway)
    body = json.dumps(
        {
            "model": NATIVE,
            "input": "write a long essay",
            "background": True,
            "max_output_tokens": 100,
        }
    ).encode()
    answer = request(gateway.url, "POST", "/v1/responses", body, {"FC-Customer": "acme"})
    assert answer.status == 200, answer.body
    queued = Response.model_validate(answer.json())
    assert queued.status == "queued" and queued.usage is None and queued.id.startswith("resp_bg")
    sent = fake_openai.received[-1].body
    assert sent["background"] is True and sent["max_output_tokens"] == 100
    worst = (len(body) * 0.15 + 100 * 0.60) / 1e6
    assert float(answer.headers["X-Ringside-Cost-USD"]) == pytest.approx(worst, rel=1e-6)
    after = wait_until(
        lambda: (found := acme_usage(gateway))["requests"] == before["requests"] + 1 and found
    )
    assert after["tokens"]["input"] - before["tokens"]["input"] == len(body)
    assert after["tokens"]["output"] - before["tokens"]["output"] == 100
    assert after["spent_usd"] - before["spent_usd"] == pytest.approx(worst, rel=1e-6)


def acme_usage(gateway: SidecarProcess) -> dict[str, Any]:
    answer = request(
        gateway.admin_url, "GET", "/v1/customers/acme/usage",
        headers={"Authorization": f"Bearer {ADMIN}"},
    )  # fmt: skip
    assert answer.status == 200, answer.body
    data: dict[str, Any] = answer.json()
    return data


def test_a_cascade_moves_from_a_translated_to_a_native_candidate(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(status=500), Reply(content="native answer"))
    raw = sdk(gateway).responses.with_raw_response.create(
        model=[TRANSLATED, NATIVE],  # type: ignore[arg-type]
        input="hi",
    )
    assert raw.parse().output_text == "native answer"
    assert raw.headers["X-Ringside-Models-Tried"] == f"{TRANSLATED},{NATIVE}"
    assert [r.path for r in fake_openai.received] == ["/v1/chat/completions", "/v1/responses"]


def test_state_skips_the_translated_candidates_of_a_cascade(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post(
        gateway,
        {"model": [TRANSLATED, NATIVE], "input": "hi", "previous_response_id": "resp_1"},
    )
    assert answer.status == 200
    assert [r.path for r in fake_openai.received] == ["/v1/responses"]


def test_a_native_client_error_is_passed_through(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(
        Reply(
            status=400,
            error_code="previous_response_not_found",
            error_message="Previous response not found.",
            error_type="invalid_request_error",
        )
    )
    answer = post(gateway, {"model": NATIVE, "input": "x", "previous_response_id": "resp_x"})
    assert answer.status == 400
    assert "Previous response not found" in answer.error["message"]


def _settings(kind: str, **fields: Any) -> Any:
    from sidecar.settings.model import ProviderSettings

    return ProviderSettings(
        name=kind, kind=kind, **{"base_url": None, "api_key_env": None, **fields}
    )


def test_native_urls_of_openai_and_azure() -> None:
    from sidecar.providers.azure import AzureAdapter
    from sidecar.providers.base import UpstreamCall
    from sidecar.providers.openai_compat import COMPAT_KINDS, OpenAICompatAdapter

    body = {"model": "fc:az/mini", "input": "x", "stream": True}
    openai_settings = _settings("openai", api_key="k")
    built = OpenAICompatAdapter(openai_settings, COMPAT_KINDS["openai"]).build_responses_request(
        UpstreamCall(openai_settings, "gpt-4o-mini", body, stream=True)
    )
    assert built.url == "https://api.openai.com/v1/responses"
    assert json.loads(built.body) == {"model": "gpt-4o-mini", "input": "x", "stream": True}
    dated = _settings(
        "azure",
        base_url="https://res.openai.azure.com",
        api_key="k",
        api_version="2025-04-01-preview",
        deployments={"mini": "mini-prod"},
    )
    built = AzureAdapter(dated).build_responses_request(UpstreamCall(dated, "mini", body))
    assert (
        built.url == "https://res.openai.azure.com/openai/responses?api-version=2025-04-01-preview"
    )
    assert built.headers["api-key"] == "k"
    assert json.loads(built.body) == {"model": "mini-prod", "input": "x"}  # not a streamed call
    v1 = _settings("azure", base_url="https://res.openai.azure.com", api_key="k")
    built = AzureAdapter(v1).build_responses_request(UpstreamCall(v1, "mini", body))
    assert built.url == "https://res.openai.azure.com/openai/v1/responses"


def test_only_openai_and_azure_are_native() -> None:
    from sidecar.providers.azure import AZURE_CAPS
    from sidecar.providers.openai_compat import COMPAT_KINDS

    native = {kind for kind, row in COMPAT_KINDS.items() if row.caps.responses}
    assert native == {"openai"} and AZURE_CAPS.responses


def test_an_idempotent_repeat_is_replayed(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    body = {"model": TRANSLATED, "input": "once"}
    first = post(gateway, body, **{"Idempotency-Key": "resp-key-1"})
    again = post(gateway, body, **{"Idempotency-Key": "resp-key-1"})
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert len(fake_openai.received) == 1
    changed = post(gateway, {**body, "input": "twice"}, **{"Idempotency-Key": "resp-key-1"})
    assert changed.status == 409


# -- stored responses: retrieve, input items, cancel, delete ---------------------------------------
def test_a_background_response_is_polled_to_its_end_through_the_sidecar(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    """Background mode as the SDK runs it: create, then `retrieve` until it is done; its input
    items too. Each call reaches the provider that made it, with the provider's key."""
    fake_openai.script(Reply(content="the essay", prompt_tokens=40, completion_tokens=900))
    client = sdk(gateway)
    queued = client.responses.create(model=NATIVE, input="write an essay", background=True)
    assert queued.status == "queued"
    done = client.responses.retrieve(queued.id)
    assert done.id == queued.id and done.status == "completed"
    assert done.output_text == "the essay" and done.usage is not None
    assert done.usage.output_tokens == 900
    items = client.responses.input_items.list(queued.id)
    assert [item.type for item in items.data] == ["message"]
    retrieved = fake_openai.received[1]
    assert retrieved.path == f"/v1/responses/{queued.id}"
    assert retrieved.headers["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert fake_openai.received[2].path == f"/v1/responses/{queued.id}/input_items"


def test_a_stored_response_is_cancelled_and_deleted(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    client = sdk(gateway)
    queued = client.responses.create(model=NATIVE, input="long job", background=True)
    cancelled = client.responses.cancel(queued.id)
    assert cancelled.id == queued.id and cancelled.status == "cancelled"
    client.responses.delete(queued.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve(queued.id)
    assert queued.id in caught.value.message  # the provider's own 404, passed on
    assert [(r.path, r.headers.get("Authorization")) for r in fake_openai.received[1:]] == [
        (f"/v1/responses/{queued.id}/cancel", f"Bearer {PROVIDER_KEY}"),
        (f"/v1/responses/{queued.id}", f"Bearer {PROVIDER_KEY}"),
        (f"/v1/responses/{queued.id}", f"Bearer {PROVIDER_KEY}"),
    ]


def test_stored_response_calls_not_in_the_api_are_404s_in_the_envelope(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    for method, path in [("PUT", "/v1/responses/resp_x"), ("POST", "/v1/responses/resp_x/restart"),
                         ("GET", "/v1/responses/resp_x/cancel")]:  # fmt: skip
        answer = request(gateway.url, method, path, {})
        assert answer.status == 404 and answer.json()["error"]["code"] == "not_found", path
    dots = request(gateway.url, "GET", "/v1/responses/resp_x%2F..%2Fmodels")
    assert dots.status == 400 and dots.json()["error"]["code"] == "invalid_request"
    assert fake_openai.received == []


def test_stored_responses_go_to_the_provider_that_made_them(tmp_path: Path) -> None:
    """Two providers with the native API: each response's calls go where it was made; an id
    this sidecar never saw goes to the first of them."""
    first, second = FakeOpenAI(), FakeOpenAI()
    first.server.start()
    second.server.start()
    config = openai_config(first.url)
    config["providers"]["second"] = {
        "kind": "openai", "base_url": second.url, "api_key_env": "SECOND_KEY",
    }  # fmt: skip
    config["models"]["fc:second/gpt-4o-mini"] = {"input_per_mtok": 0.15, "output_per_mtok": 0.6}
    proc = start_sidecar(tmp_path, config, {"SECOND_KEY": "second-provider-key"}).start()
    try:
        client = sdk(proc)
        made = client.responses.create(model="fc:second/gpt-4o-mini", input="hi", background=True)
        assert client.responses.retrieve(made.id).status == "completed"
        assert [r.path for r in second.received] == ["/v1/responses", f"/v1/responses/{made.id}"]
        assert second.received[1].headers["Authorization"] == "Bearer second-provider-key"
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve("resp_made_elsewhere")
        assert [r.path for r in first.received] == ["/v1/responses/resp_made_elsewhere"]
    finally:
        proc.stop()
        first.server.stop()
        second.server.stop()


def test_without_a_native_provider_a_stored_response_is_a_404_saying_why(tmp_path: Path) -> None:
    config = {"storage": {"backend": "memory"}, "providers": {"mock": {"kind": "mock"}}}
    proc = start_sidecar(tmp_path, config).start()
    try:
        answer = request(proc.url, "GET", "/v1/responses/resp_abc")
    finally:
        proc.stop()
    assert answer.status == 404
    error = answer.json()["error"]
    assert error["code"] == "not_found" and "native Responses API" in error["message"]


def test_stored_response_urls_of_openai_and_azure() -> None:
    """A stored response's call goes under the provider's responses URL, the provider's query
    (azure's api-version) first, with its credentials and not its JSON defaults."""
    from sidecar.http1 import Http1Client
    from sidecar.passthrough import PassthroughTable
    from sidecar.providers import build_client
    from sidecar.stored_responses import ResponseOwners, stored_route

    http1 = Http1Client()
    dated = _settings(
        "azure", base_url="https://res.openai.azure.com", api_key="k",
        api_version="2025-04-01-preview",
    )  # fmt: skip
    v1 = _settings("azure", base_url="https://res.openai.azure.com", api_key="k")
    native = _settings("openai", api_key="sk-provider")
    owners = ResponseOwners(limit=2)
    for settings, path, query, url in [
        (dated, "/v1/responses/resp_1/input_items", "limit=5",
         "https://res.openai.azure.com/openai/responses/resp_1/input_items"
         "?api-version=2025-04-01-preview&limit=5"),
        (v1, "/v1/responses/resp_1", "", "https://res.openai.azure.com/openai/v1/responses/resp_1"),
        (native, "/v1/responses/resp_1/cancel", "",
         "https://api.openai.com/v1/responses/resp_1/cancel"),
    ]:  # fmt: skip
        table = PassthroughTable({}, {settings.name: build_client(settings, http1)})
        route = stored_route("resp_1", owners, table)
        assert route is not None
        assert route.url(path, query) == url
        assert not {"content-type", "accept"} & {name.lower() for name in route.headers}
    assert route.headers == {"Authorization": "Bearer sk-provider"}
    for response_id in ("resp_a", "resp_b", "resp_c"):  # the oldest is forgotten past the limit
        owners.remember(response_id, "second")
    assert [owners.owner(i) for i in ("resp_a", "resp_b", "resp_c")] == [None, "second", "second"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/responses/" + "r" * 4000,  # a huge id
        "/v1/responses/resp%0D%0AX-Injected:%201",  # CR/LF
        "/v1/responses/resp%00x",  # NUL
        "/v1/responses/%FF%FE",  # not UTF-8
        "/v1/responses/resp_x/input_items?limit=" + "9" * 2000,  # a huge query
    ],
    ids=["huge", "crlf", "nul", "not-utf8", "huge-query"],
)
def test_a_hostile_stored_response_path_is_an_envelope_and_the_sidecar_goes_on(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, path: str
) -> None:
    answer = request(gateway.url, "GET", path)
    assert 400 <= answer.status < 500, (answer.status, answer.body[:200])
    assert answer.headers["Content-Type"].startswith("application/json")
    assert "error" in answer.json()
    for seen in fake_openai.received:  # what went upstream stayed one request line, encoded
        assert seen.path.startswith("/v1/responses/")
        assert seen.headers["Authorization"] == f"Bearer {PROVIDER_KEY}"
        assert "X-Injected" not in seen.headers
    assert sdk(gateway).models.list().data  # and the next request is served
