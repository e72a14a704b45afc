"""The `cohere` kind (Cohere v2 Chat API), translated both ways.

In process: the adapter's request bodies (checked by the fake's validator, which is the cohere
SDK's own request types), its answers and stream chunks (validated as OpenAI objects), and its
error classification. End to end: a real sidecar and the official `openai` SDK against a fake
Cohere (tests/upstreams/cohere_fake.py) that checks every request: plain, stream, tool round
trip, streamed tool call, vision, errors and escalation in a cascade, structured output with a
re-prompt, usage and cost.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from sidecar.errors import Outcome, UpstreamError
from sidecar.providers.base import UpstreamCall
from sidecar.providers.cohere import CohereAdapter
from sidecar.schema_check import format_instruction
from sidecar.settings.model import ProviderSettings
from tests.procs import SidecarProcess
from tests.support import (
    HELLO,
    module_sidecar,
    post_chat,
    ringside,
    sdk,
    sse_events,
    without_circuit_breakers,
)
from tests.upstreams.cohere_fake import FakeCohere, Reply, ToolCall, request_problems

COHERE_KEY = "cohere-test-key-0123456789"
MODEL = "command-a-03-2025"
SMALL = "command-r7b-12-2024"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
PERSON = {
    "type": "json_schema",
    "json_schema": {
        "name": "person",
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        },
    },
}


# -- in process: the adapter ---------------------------------------------------------------------


def adapter(**fields: Any) -> CohereAdapter:
    fields.setdefault("base_url", None)
    settings = ProviderSettings(
        name="co", kind="cohere", api_key_env="CO_KEY", api_key=COHERE_KEY, **fields
    )
    return CohereAdapter(settings)


def built(body: dict[str, Any], stream: bool = False) -> dict[str, Any]:
    """The v2 body the adapter sends for an OpenAI body, checked as the API would."""
    call = UpstreamCall(ProviderSettings("co", "cohere", None, None), MODEL, body, stream=stream)
    request = adapter().build_request(call)
    sent: dict[str, Any] = orjson.loads(request.body)
    assert request_problems(json.loads(request.body)) == []
    return sent


def refusal(body: dict[str, Any]) -> UpstreamError:
    with pytest.raises(UpstreamError) as raised:
        built(body)
    assert raised.value.outcome is Outcome.CLIENT_FAULT
    assert raised.value.client_error is not None and raised.value.client_error.status == 400
    return raised.value


def test_the_request_goes_to_v2_chat_with_a_bearer_key() -> None:
    call = UpstreamCall(ProviderSettings("co", "cohere", None, None), MODEL, {"messages": HELLO})
    request = adapter().build_request(call)
    assert request.url == "https://api.cohere.com/v2/chat"
    assert request.headers["Authorization"] == f"Bearer {COHERE_KEY}"
    own = adapter(base_url="https://cohere.internal/").build_request(call)
    assert own.url == "https://cohere.internal/v2/chat"


def test_messages_keep_their_roles_and_developer_is_system() -> None:
    sent = built({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "system", "content": [{"type": "text", "text": "in English"}]},
        {"role": "user", "content": "hi", "name": "bob"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]})  # fmt: skip
    assert sent["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "system", "content": [{"type": "text", "text": "in English"}]},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    assert sent["model"] == MODEL and sent["stream"] is False


def test_image_parts_go_as_v2_image_url_parts() -> None:
    image = {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}
    sent = built({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": image},
    ]}]})  # fmt: skip
    assert sent["messages"][0]["content"][1] == {"type": "image_url", "image_url": image}


def test_audio_parts_are_refused_naming_the_part() -> None:
    part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    error = refusal({"messages": [{"role": "user", "content": [part]}]})
    assert error.client_error is not None
    assert error.client_error.param == "messages[0].content[0]"
    assert "'co'" in error.message and "input_audio" in error.message


def test_n_above_one_is_refused_naming_the_provider() -> None:
    error = refusal({"messages": HELLO, "n": 2})
    assert error.client_error is not None and error.client_error.param == "n"
    assert "provider 'co' (Cohere v2 Chat API)" in error.message


def test_sampling_parameters_are_translated_into_v2_ranges() -> None:
    sent = built({
        "messages": HELLO, "temperature": 0.7, "top_p": 1.0, "top_k": 40, "seed": 7,
        "max_tokens": 300, "max_completion_tokens": 200, "stop": "END",
        "frequency_penalty": 1.5, "presence_penalty": -0.5, "user": "u1", "logprobs": True,
        "parallel_tool_calls": False, "metadata": {"a": "b"},
    })  # fmt: skip
    assert {k: v for k, v in sent.items() if k not in ("model", "messages", "stream")} == {
        "temperature": 0.7, "p": 0.99, "k": 40, "seed": 7, "max_tokens": 200,
        "stop_sequences": ["END"], "frequency_penalty": 1,
    }  # fmt: skip


def test_max_tokens_above_the_catalogs_max_output_is_sent_as_that_limit() -> None:
    call = UpstreamCall(ProviderSettings("co", "cohere", None, None), MODEL,
                        {"messages": HELLO, "max_tokens": 9000}, max_output=4096)  # fmt: skip
    sent = orjson.loads(adapter().build_request(call).body)
    assert sent["max_tokens"] == 4096
    call.body = {"messages": HELLO}
    assert "max_tokens" not in orjson.loads(adapter().build_request(call).body)  # v2's default


def test_tool_calls_and_results_round_trip_with_their_ids() -> None:
    call = {"id": "get_weather_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}  # fmt: skip
    sent = built({"tools": [WEATHER_TOOL], "messages": [
        *HELLO,
        {"role": "assistant", "content": "I will look it up.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "get_weather_1", "content": '{"temp_c": 4}'},
    ]})  # fmt: skip
    assert sent["messages"][1] == {
        "role": "assistant", "tool_calls": [call], "tool_plan": "I will look it up.",
    }  # fmt: skip
    assert sent["messages"][2] == {
        "role": "tool", "tool_call_id": "get_weather_1", "content": '{"temp_c": 4}',
    }  # fmt: skip
    assert sent["tools"] == [WEATHER_TOOL]
    assert "tool_choice" not in sent  # auto: v2's default


@pytest.mark.parametrize(
    ("choice", "expected"), [("required", "REQUIRED"), ("none", "NONE"), ("auto", None)]
)
def test_tool_choice_modes(choice: str, expected: str | None) -> None:
    sent = built({"messages": HELLO, "tools": [WEATHER_TOOL], "tool_choice": choice})
    assert sent.get("tool_choice") == expected


def test_a_named_tool_choice_is_required_with_only_that_tool() -> None:
    other = {"type": "function", "function": {"name": "get_time", "parameters": {}}}
    sent = built(
        {
            "messages": HELLO,
            "tools": [other, WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        }
    )
    assert sent["tool_choice"] == "REQUIRED"
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather"]


def test_json_schema_goes_as_json_object_with_its_schema() -> None:
    sent = built({"messages": HELLO, "response_format": PERSON})
    assert sent["response_format"] == {
        "type": "json_object", "json_schema": PERSON["json_schema"]["schema"],
    }  # fmt: skip
    plain = built({"messages": HELLO, "response_format": {"type": "json_object"}})
    assert plain["response_format"] == {"type": "json_object"}


def test_a_response_format_beside_tools_is_asked_for_in_words() -> None:
    sent = built({"messages": [{"role": "system", "content": "s"}, *HELLO],
                  "tools": [WEATHER_TOOL], "response_format": PERSON})  # fmt: skip
    assert "response_format" not in sent
    assert sent["messages"][1] == {"role": "system", "content": format_instruction(PERSON)}
    assert "JSON Schema" in sent["messages"][1]["content"]


def test_a_schema_that_is_no_object_is_asked_for_in_words() -> None:
    listing = {"type": "json_schema", "json_schema": {"name": "l", "schema": {"type": "array"}}}
    sent = built({"messages": HELLO, "response_format": listing})
    assert "response_format" not in sent
    assert sent["messages"][0]["role"] == "system"


def parsed(data: dict[str, Any]) -> ChatCompletion:
    call = UpstreamCall(ProviderSettings("co", "cohere", None, None), MODEL, {"messages": HELLO})
    answer = adapter().parse_response(orjson.dumps(data), call)
    return ChatCompletion.model_validate(answer.body)


def test_an_answer_is_a_chat_completion_charged_by_billed_units() -> None:
    completion = parsed({
        "id": "r1", "finish_reason": "COMPLETE",
        "message": {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "Hi!"}]},
        "usage": {"billed_units": {"input_tokens": 5, "output_tokens": 2},
                  "tokens": {"input_tokens": 71, "output_tokens": 2}, "cached_tokens": 3},
    })  # fmt: skip
    assert completion.choices[0].message.content == "Hi!"
    assert completion.model == MODEL
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 2)
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 3


def test_without_billed_units_the_tokens_are_charged() -> None:
    completion = parsed({
        "id": "r1", "finish_reason": "COMPLETE",
        "message": {"role": "assistant", "content": [{"type": "text", "text": "x"}]},
        "usage": {"tokens": {"input_tokens": 71.0, "output_tokens": 2.0}},
    })  # fmt: skip
    assert completion.usage is not None and completion.usage.total_tokens == 73


@pytest.mark.parametrize(
    ("cohere", "openai"),
    [("COMPLETE", "stop"), ("STOP_SEQUENCE", "stop"), ("MAX_TOKENS", "length")],
)
def test_finish_reasons(cohere: str, openai: str) -> None:
    completion = parsed({"id": "r", "finish_reason": cohere, "message": {
        "role": "assistant", "content": [{"type": "text", "text": "x"}]}})  # fmt: skip
    assert completion.choices[0].finish_reason == openai


def test_tool_calls_come_back_with_the_tool_plan_as_content() -> None:
    completion = parsed({"id": "r", "finish_reason": "TOOL_CALL", "message": {
        "role": "assistant", "tool_plan": "I will check.", "tool_calls": [
            {"id": "get_weather_x", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]}})  # fmt: skip
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will check."
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert (call.id, call.function.name, call.function.arguments) == (  # type: ignore[union-attr]
        "get_weather_x", "get_weather", '{"city":"Oslo"}',
    )  # fmt: skip


@pytest.mark.parametrize("reason", ["ERROR", "TIMEOUT"])
def test_an_error_finish_is_an_upstream_failure(reason: str) -> None:
    with pytest.raises(UpstreamError) as raised:
        parsed({"id": "r", "finish_reason": reason, "message": {"role": "assistant"}})
    assert raised.value.outcome is Outcome.UNAVAILABLE


def classified(status: int, message: str, headers: dict[str, str] | None = None) -> UpstreamError:
    body = orjson.dumps({"id": "e1", "message": message})
    return adapter().classify_error(status, body, headers or {})


def test_a_429_escalates_with_its_retry_after() -> None:
    error = classified(429, "You are past the per minute request limit", {"Retry-After": "2"})
    assert (error.outcome, error.retry_after) == (Outcome.UNAVAILABLE, 2.0)


@pytest.mark.parametrize("status", [401, 402, 498])
def test_the_gateways_key_or_account_refused_escalates_without_quoting_cohere(status: int) -> None:
    error = classified(status, "invalid api token")
    assert error.outcome is Outcome.UNAVAILABLE
    assert "invalid api token" not in error.message and error.detail == "invalid api token"


@pytest.mark.parametrize("status", [499, 500, 503, 504])
def test_5xx_and_cancelled_escalate(status: int) -> None:
    assert classified(status, "internal error").outcome is Outcome.UNAVAILABLE


def test_a_prompt_too_long_is_a_context_length_failure() -> None:
    error = classified(400, "too many tokens: total number of tokens in the prompt cannot "
                            "exceed 4081 - received 4292. Try using a shorter prompt")  # fmt: skip
    assert error.outcome is Outcome.CONTEXT_LENGTH


def test_max_tokens_above_the_models_limit_is_the_requests_fault() -> None:
    error = classified(400, "too many tokens: max tokens must be less than or equal to 4096, "
                            "the maximum output for this model - received 8192.")  # fmt: skip
    assert error.outcome is Outcome.CLIENT_FAULT
    assert error.client_error is not None and error.client_error.param == "max_tokens"


def test_any_other_400_is_the_requests_fault_with_cohere_words() -> None:
    error = classified(400, "invalid request: tool names can only contain certain characters")
    assert error.outcome is Outcome.CLIENT_FAULT
    assert error.client_error is not None
    assert error.client_error.message.startswith("invalid request: tool names")


def events(*payloads: dict[str, Any]) -> list[tuple[str, bytes]]:
    return [(str(p["type"]), orjson.dumps(p)) for p in payloads]


def message(**inner: Any) -> dict[str, Any]:
    return {"message": inner}


def decoded(
    stream: list[tuple[str, bytes]], wants_usage: bool = False
) -> tuple[list[ChatCompletionChunk], Any]:
    body: dict[str, Any] = {"messages": HELLO}
    if wants_usage:
        body["stream_options"] = {"include_usage": True}
    call = UpstreamCall(ProviderSettings("co", "cohere", None, None), MODEL, body, stream=True,
                        keep_content=True)  # fmt: skip
    decoder = adapter().stream_decoder(call)
    chunks = [c for event, data in stream for c in decoder.feed(event, data)]
    assert decoder.finished
    return [ChatCompletionChunk.model_validate_json(c) for c in chunks], decoder


END_USAGE = {"billed_units": {"input_tokens": 4, "output_tokens": 3},
             "tokens": {"input_tokens": 60, "output_tokens": 3}}  # fmt: skip


def test_stream_text_deltas_become_chunks_and_message_end_the_finish() -> None:
    chunks, decoder = decoded(events(
        {"type": "message-start", "id": "m1", "delta": message(role="assistant")},
        {"type": "content-start", "index": 0,
         "delta": message(content={"type": "text", "text": ""})},
        {"type": "content-delta", "index": 0, "delta": message(content={"text": "Hel"})},
        {"type": "content-delta", "index": 0, "delta": message(content={"text": "lo"})},
        {"type": "content-end", "index": 0},
        {"type": "message-end", "delta": {"finish_reason": "COMPLETE", "usage": END_USAGE}},
    ))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.id == "m1" and c.model == MODEL and c.usage is None for c in chunks)
    assert decoder.content == "Hello"
    assert (decoder.usage.prompt_tokens, decoder.usage.completion_tokens) == (4, 3)


def test_stream_ends_with_the_usage_chunk_when_asked() -> None:
    chunks, _ = decoded(events(
        {"type": "content-delta", "index": 0, "delta": message(content={"text": "x"})},
        {"type": "message-end", "delta": {"finish_reason": "MAX_TOKENS", "usage": END_USAGE}},
    ), wants_usage=True)  # fmt: skip
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 7


def test_streamed_tool_calls_get_openai_indexes_and_argument_deltas() -> None:
    def start(index: int, name: str) -> dict[str, Any]:
        call = {"id": f"{name}_id", "type": "function",
                "function": {"name": name, "arguments": ""}}  # fmt: skip
        return {"type": "tool-call-start", "index": index, "delta": message(tool_calls=call)}

    def delta(index: int, piece: str) -> dict[str, Any]:
        calls = {"function": {"arguments": piece}}
        return {"type": "tool-call-delta", "index": index, "delta": message(tool_calls=calls)}

    chunks, _ = decoded(events(
        {"type": "tool-plan-delta", "delta": message(tool_plan="Checking.")},
        start(0, "get_weather"), delta(0, '{"city":'), delta(0, '"Oslo"}'),
        {"type": "tool-call-end", "index": 0},
        start(1, "get_time"), delta(1, "{}"), {"type": "tool-call-end", "index": 1},
        {"type": "message-end", "delta": {"finish_reason": "TOOL_CALL", "usage": END_USAGE}},
    ))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Checking."
    calls = [call for c in chunks for call in c.choices[0].delta.tool_calls or ()]
    assert [(c.index, c.id) for c in calls if c.id] == [(0, "get_weather_id"), (1, "get_time_id")]
    arguments = "".join(c.function.arguments or "" for c in calls if c.index == 0 and c.function)
    assert arguments == '{"city":"Oslo"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_stream_ending_in_error_is_an_upstream_failure() -> None:
    with pytest.raises(UpstreamError) as raised:
        decoded(events(
            {"type": "content-delta", "index": 0, "delta": message(content={"text": "x"})},
            {"type": "message-end", "delta": {"finish_reason": "ERROR", "error": "overloaded"}},
        ))  # fmt: skip
    assert raised.value.outcome is Outcome.UNAVAILABLE
    assert "overloaded" in raised.value.message


# -- end to end: a sidecar, the openai SDK, the fake Cohere -------------------------------------


@pytest.fixture(scope="module")
def cohere_api() -> Iterator[FakeCohere]:
    fake = FakeCohere(COHERE_KEY)
    fake.server.start()
    yield fake
    fake.server.stop()


@pytest.fixture
def fake(cohere_api: FakeCohere) -> Iterator[FakeCohere]:
    cohere_api.reset()
    yield cohere_api
    assert cohere_api.problems == []


@pytest.fixture(scope="module")
def sidecar(
    cohere_api: FakeCohere, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    def provider(key_env: str) -> dict[str, Any]:
        return {"kind": "cohere", "base_url": cohere_api.url, "api_key_env": key_env,
                "timeout": {"connect": 2, "read": 5}}  # fmt: skip

    config = {
        "storage": {"backend": "memory"},
        "providers": {
            "co": provider("CO_KEY"),
            "co2": provider("CO_KEY"),
            "cobad": provider("CO_BAD_KEY"),
        },
        "models": {
            f"fc:co/{SMALL}": {
                "input_per_mtok": 0.0375,
                "output_per_mtok": 0.15,
                "context": 128000,
            },
            f"fc:co2/{MODEL}": {"input_per_mtok": 2.5, "output_per_mtok": 10.0, "context": 256000},
        },
        "slots": {
            "chat": [f"fc:co/{SMALL}", f"fc:co2/{MODEL}"],
            "badkey": [f"fc:cobad/{SMALL}", f"fc:co2/{MODEL}"],
        },
    }
    env = {"CO_KEY": COHERE_KEY, "CO_BAD_KEY": "not-the-key"}
    workdir = tmp_path_factory.mktemp("cohere")
    yield from module_sidecar(workdir, without_circuit_breakers(config), env)


def raw_completion(proc: SidecarProcess, body: dict[str, Any]) -> ChatCompletion:
    answer = post_chat(proc, body)
    assert answer.status == 200, answer.body
    return ChatCompletion.model_validate(answer.json())


def raw_chunks(proc: SidecarProcess, body: dict[str, Any]) -> list[ChatCompletionChunk]:
    answer = post_chat(proc, {**body, "stream": True})
    assert answer.status == 200, answer.body
    payloads = sse_events(answer.body)
    assert payloads[-1] == "[DONE]"
    return [ChatCompletionChunk.model_validate_json(p) for p in payloads[:-1]]


def test_plain_answer_through_the_openai_sdk(sidecar: SidecarProcess, fake: FakeCohere) -> None:
    answer = sdk(sidecar).chat.completions.create(
        model=f"fc:co2/{MODEL}", messages=[{"role": "system", "content": "be nice"}, *HELLO],
        temperature=0.2, max_tokens=64,
    )  # fmt: skip
    assert answer.choices[0].message.content == "Hello from the fake Cohere."
    assert answer.model == MODEL
    assert answer.usage is not None and answer.usage.prompt_tokens == 9  # billed, not 12
    (seen,) = fake.received
    assert seen.path == "/v2/chat"
    assert seen.headers["Authorization"] == f"Bearer {COHERE_KEY}"
    assert seen.body["messages"] == [{"role": "system", "content": "be nice"}, *HELLO]
    assert (seen.body["temperature"], seen.body["max_tokens"]) == (0.2, 64)


def test_usage_and_cost_are_the_billed_units(sidecar: SidecarProcess, fake: FakeCohere) -> None:
    fake.script(Reply(input_tokens=1200, output_tokens=100, billed_input=1000, billed_output=100))
    answer = post_chat(sidecar, {"model": f"fc:co2/{MODEL}", "messages": HELLO})
    assert answer.status == 200
    assert answer.json()["usage"]["prompt_tokens"] == 1000
    # 1000 × 2.5 + 100 × 10 per million tokens
    assert float(answer.headers["X-Ringside-Cost-USD"]) == pytest.approx(0.0035)


def test_stream_chunks_validate_as_openai_chunks(sidecar: SidecarProcess, fake: FakeCohere) -> None:
    fake.script(Reply(content="one two three four", chunks=4, thinking="let me think"))
    chunks = raw_chunks(sidecar, {"model": f"fc:co2/{MODEL}", "messages": HELLO})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "one two three four"
    )
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # not asked for
    assert fake.received[0].body["stream"] is True


def test_stream_include_usage(sidecar: SidecarProcess, fake: FakeCohere) -> None:
    stream = sdk(sidecar).chat.completions.create(
        model=f"fc:co2/{MODEL}", messages=HELLO, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 9


def test_tool_round_trip(sidecar: SidecarProcess, fake: FakeCohere) -> None:
    client = sdk(sidecar)
    fake.script(Reply(tool_calls=[ToolCall("get_weather", '{"city": "Oslo"}')],
                      tool_plan="I will look up the weather."))  # fmt: skip
    first = client.chat.completions.create(
        model=f"fc:co2/{MODEL}", messages=HELLO, tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )  # fmt: skip
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.function.arguments == '{"city": "Oslo"}'  # type: ignore[union-attr]
    messages: list[Any] = [
        *HELLO,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 4}'},
    ]
    second = client.chat.completions.create(
        model=f"fc:co2/{MODEL}", messages=messages, tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )  # fmt: skip
    assert second.choices[0].message.content == "Hello from the fake Cohere."
    sent = fake.received[1].body["messages"]
    assert sent[1]["tool_calls"][0]["id"] == call.id
    assert sent[1]["tool_plan"] == "I will look up the weather."
    assert sent[2] == {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 4}'}


def test_streamed_tool_call(sidecar: SidecarProcess, fake: FakeCohere) -> None:
    fake.script(Reply(tool_calls=[ToolCall("get_weather", '{"city": "Oslo"}')], chunks=3))
    body = {"model": f"fc:co2/{MODEL}", "messages": HELLO, "tools": [WEATHER_TOOL],
            "tool_choice": "required"}  # fmt: skip
    chunks = raw_chunks(sidecar, body)
    calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or ()]
    assert calls[0].function is not None and calls[0].function.name == "get_weather"
    assert "".join(c.function.arguments or "" for c in calls if c.function) == ('{"city": "Oslo"}')
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert fake.received[0].body["tool_choice"] == "REQUIRED"


def test_a_vision_part_reaches_cohere(sidecar: SidecarProcess, fake: FakeCohere) -> None:
    part = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, part]}]
    raw_completion(sidecar, {"model": f"fc:co2/{MODEL}", "messages": messages})
    assert fake.received[0].body["messages"][0]["content"][1] == part


def test_a_429_escalates_to_the_next_candidate(sidecar: SidecarProcess, fake: FakeCohere) -> None:
    fake.script(Reply(status=429, message="You are past the per minute request limit"))
    answer = post_chat(sidecar, {"model": "slot:chat", "messages": HELLO})
    assert answer.status == 200, answer.body
    ChatCompletion.model_validate(answer.json())
    assert answer.headers["X-Ringside-Model-Used"] == f"fc:co2/{MODEL}"
    assert answer.headers["X-Ringside-Fallback-Triggered"] == "true"
    assert [r.body["model"] for r in fake.received] == [SMALL, MODEL]


@pytest.mark.parametrize("status", [500, 503])
def test_a_5xx_escalates(sidecar: SidecarProcess, fake: FakeCohere, status: int) -> None:
    fake.script(Reply(status=status, message="internal server error"))
    answer = post_chat(sidecar, {"model": "slot:chat", "messages": HELLO})
    assert answer.status == 200
    assert answer.headers["X-Ringside-Model-Used"] == f"fc:co2/{MODEL}"


def test_a_rejected_key_escalates_and_is_logged_without_the_key(
    sidecar: SidecarProcess, fake: FakeCohere
) -> None:
    answer = post_chat(sidecar, {"model": "slot:badkey", "messages": HELLO})
    assert answer.status == 200
    assert answer.headers["X-Ringside-Models-Tried"] == f"fc:cobad/{SMALL},fc:co2/{MODEL}"
    assert fake.received[0].headers["Authorization"] == "Bearer not-the-key"
    log = sidecar.stderr() + sidecar.stdout()
    assert "provider cobad rejected the gateway's credentials (HTTP 401)" in log
    assert "not-the-key" not in log


def test_an_error_finish_escalates(sidecar: SidecarProcess, fake: FakeCohere) -> None:
    fake.script(Reply(error="internal error during generation"))
    answer = post_chat(sidecar, {"model": "slot:chat", "messages": HELLO})
    assert answer.status == 200
    assert answer.headers["X-Ringside-Fallback-Triggered"] == "true"


def test_a_prompt_too_long_escalates_as_context_length(
    sidecar: SidecarProcess, fake: FakeCohere
) -> None:
    too_long = (
        "too many tokens: total number of tokens in the prompt cannot exceed 128000 - "
        "received 130000. Try using a shorter prompt, or enabling prompt truncating."
    )
    fake.script(Reply(status=400, message=too_long), Reply(status=400, message=too_long))
    answer = post_chat(sidecar, {"model": "slot:chat", "messages": HELLO})
    assert answer.status == 400
    assert (answer.error["code"], answer.error["param"]) == ("context_length_exceeded", "messages")
    assert len(fake.received) == 2


def test_another_400_is_returned_at_once(sidecar: SidecarProcess, fake: FakeCohere) -> None:
    fake.script(Reply(status=400, message="invalid request: model 'x' is not supported"))
    answer = post_chat(sidecar, {"model": "slot:chat", "messages": HELLO})
    assert answer.status == 400
    assert "model 'x' is not supported" in answer.error["message"]
    assert len(fake.received) == 1


def test_an_error_finish_mid_stream_ends_with_an_sse_error(
    sidecar: SidecarProcess, fake: FakeCohere
) -> None:
    fake.script(Reply(content="half an answer", error="overloaded"))
    answer = post_chat(sidecar, {"model": f"fc:co2/{MODEL}", "messages": HELLO, "stream": True})
    payloads = sse_events(answer.body)
    last = json.loads(payloads[-1])
    assert "error" in last and "overloaded" in last["error"]["message"]
    chunks = [ChatCompletionChunk.model_validate_json(p) for p in payloads[:-1]]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "half an answer"


def test_structured_output_natively_with_one_reprompt(
    sidecar: SidecarProcess, fake: FakeCohere
) -> None:
    fake.script(Reply(content='{"name": "Ada"}'), Reply(content='{"name": "Ada", "age": 36}'))
    answer = post_chat(sidecar, {"model": f"fc:co2/{MODEL}", "messages": HELLO,
                                 "response_format": PERSON})  # fmt: skip
    assert answer.status == 200, answer.body
    completion = ChatCompletion.model_validate(answer.json())
    assert json.loads(completion.choices[0].message.content or "") == {"name": "Ada", "age": 36}
    assert answer.headers["X-Ringside-Schema-Reprompts"] == "1"
    first, second = fake.received
    assert first.body["response_format"] == {
        "type": "json_object", "json_schema": PERSON["json_schema"]["schema"],
    }  # fmt: skip
    assert second.body["messages"][1] == {"role": "assistant", "content": '{"name": "Ada"}'}
    assert "age" in str(second.body["messages"][2]["content"])


def test_a_cohere_provider_passes_check_config(tmp_path: Path) -> None:
    path = tmp_path / "ringside.yaml"
    path.write_text(
        "storage: {backend: memory}\nproviders:\n  co: {kind: cohere, api_key_env: CO_KEY}\n"
    )
    result = ringside("check-config", str(path), env={"CO_KEY": "k"})
    assert result.returncode == 0, result.stderr


def test_a_streamed_structured_answer_streams_through_and_is_validated_at_the_end(
    sidecar: SidecarProcess, fake: FakeCohere
) -> None:
    fake.script(Reply(content='{"name": "Ada", "age": 36}', chunks=4))
    body = {"model": f"fc:co2/{MODEL}", "messages": HELLO, "response_format": PERSON}
    chunks = raw_chunks(sidecar, body)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(text) == {"name": "Ada", "age": 36}
    assert (
        fake.received[0].body["response_format"]["json_schema"] == (PERSON["json_schema"]["schema"])
    )


def test_a_streamed_answer_that_misses_the_schema_ends_with_an_sse_error(
    sidecar: SidecarProcess, fake: FakeCohere
) -> None:
    fake.script(Reply(content='{"name": "Ada"}'))
    body = {"model": f"fc:co2/{MODEL}", "messages": HELLO, "response_format": PERSON,
            "stream": True}  # fmt: skip
    payloads = sse_events(post_chat(sidecar, body).body)
    last = json.loads(payloads[-1])
    assert last["error"]["code"] == "response_schema_validation_failed"
