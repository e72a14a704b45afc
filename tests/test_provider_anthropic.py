"""The `anthropic` kind: OpenAI chat ⇄ Anthropic Messages, both ways.

In process: the adapter's pure translation (every body it builds is checked against the official
SDK's request type). End to end: a sidecar process in front of the fake Messages API
(tests/upstreams/anthropic_fake.py), called with the official `openai` SDK, every answer
validated as an OpenAI `chat.completion` / `chat.completion.chunk`.
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
from sidecar.providers import ADAPTERS
from sidecar.providers.anthropic import AnthropicAdapter
from sidecar.providers.anthropic_request import DEFAULT_MAX_TOKENS
from sidecar.providers.base import UpstreamCall
from sidecar.settings.model import ProviderSettings
from tests.procs import SidecarProcess
from tests.support import (
    module_sidecar,
    post_chat,
    ringside,
    sdk,
    sse_events,
    without_circuit_breakers,
)
from tests.test_budget import ADMIN_ENV, nano, settled_usage
from tests.upstreams.anthropic_fake import FakeAnthropic, Reply, ToolUse, request_problems
from tests.upstreams.openai_fake import FakeOpenAI

KEY = "sk-ant-test-provider-key"
HAIKU = "fc:anthropic/claude-3-5-haiku-latest"
MINI = "fc:openai/gpt-4o-mini"
HELLO: list[Any] = [{"role": "user", "content": "hi"}]
PIXEL = (  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4"
    "nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="
)
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
PERSON: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {
        "name": "person",
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
    },
}


# -- in process: the translation ----------------------------------------------------------------
def adapter(**settings: Any) -> AnthropicAdapter:
    fields: dict[str, Any] = {
        "name": "claude",
        "kind": "anthropic",
        "base_url": None,
        "api_key_env": None,
        "api_key": KEY,
        **settings,
    }
    return AnthropicAdapter(ProviderSettings(**fields))


def call(body: dict[str, Any], *, stream: bool = False, max_output: int | None = None) -> Any:
    return UpstreamCall(
        ProviderSettings("claude", "anthropic", None, None),
        "claude-3-5-haiku-latest",
        {"model": HAIKU, **body},
        stream,
        max_output=max_output,
    )


def translate(body: dict[str, Any], **options: Any) -> dict[str, Any]:
    """The Messages body for `body`, after checking the official SDK type accepts it."""
    sent: dict[str, Any] = orjson.loads(adapter().build_request(call(body, **options)).body)
    assert request_problems(sent) == []
    return sent


def refusal(body: dict[str, Any]) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        adapter().build_request(call(body))
    error = caught.value
    assert error.outcome is Outcome.CLIENT_FAULT and error.client_error is not None
    assert error.client_error.status == 400 and "'claude'" in error.message
    return error


def test_the_kind_is_registered_with_its_capabilities() -> None:
    built = ADAPTERS["anthropic"](ProviderSettings("claude", "anthropic", None, None))
    assert built.caps.names() == {"tools", "vision", "json_schema", "usage_in_stream"}
    assert built.native_json_schema and not built.json_mode


def test_requests_go_to_v1_messages_with_the_key_and_the_api_version() -> None:
    request = adapter().build_request(call({"messages": HELLO}))
    assert request.url == "https://api.anthropic.com/v1/messages"
    assert request.headers["x-api-key"] == KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in request.headers
    own = adapter(base_url="http://127.0.0.1:9/", headers={"anthropic-beta": "x"})
    request = own.build_request(call({"messages": HELLO}))
    assert request.url == "http://127.0.0.1:9/v1/messages"
    assert request.headers["anthropic-beta"] == "x"


def test_system_and_developer_messages_become_the_system_prompt() -> None:
    sent = translate(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
                {"role": "user", "content": "hi"},
            ]
        }
    )
    assert sent["system"] == "Be brief.\n\nUse French."
    assert sent["messages"] == [{"role": "user", "content": "hi"}]


def test_a_conversation_of_only_system_text_is_sent_as_a_user_turn() -> None:
    sent = translate({"messages": [{"role": "system", "content": "Say hi."}]})
    assert sent["messages"] == [{"role": "user", "content": "Say hi."}] and "system" not in sent


def test_consecutive_turns_of_one_role_are_merged() -> None:
    sent = translate(
        {
            "messages": [
                {"role": "user", "content": "one"},
                {"role": "user", "content": [{"type": "text", "text": "two"}]},
                {"role": "assistant", "content": "three"},
                {"role": "assistant", "content": "four"},
                {"role": "user", "content": "five"},
            ]
        }
    )
    assert sent["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "three"}, {"type": "text", "text": "four"}],
        },
        {"role": "user", "content": "five"},
    ]


def test_max_tokens_is_the_requests_else_the_catalogs_else_the_default() -> None:
    assert translate({"messages": HELLO, "max_tokens": 50}, max_output=8192)["max_tokens"] == 50
    body = {"messages": HELLO, "max_completion_tokens": 70, "max_tokens": 50}
    assert translate(body)["max_tokens"] == 70
    assert translate({"messages": HELLO}, max_output=8192)["max_tokens"] == 8192
    assert (
        translate({"messages": HELLO, "max_tokens": 10**6}, max_output=8192)["max_tokens"] == 8192
    )
    assert translate({"messages": HELLO})["max_tokens"] == DEFAULT_MAX_TOKENS


@pytest.mark.parametrize(("given", "sent"), [(0, 0), (0.7, 0.7), (1, 1), (1.5, 1), (2, 1)])
def test_temperature_is_clamped_to_anthropics_zero_to_one(given: float, sent: float) -> None:
    assert translate({"messages": HELLO, "temperature": given})["temperature"] == sent


def test_sampling_stop_and_user_are_translated_and_openai_only_parameters_dropped() -> None:
    sent = translate(
        {
            "messages": HELLO,
            "top_p": 0.9,
            "stop": "END",
            "user": "u-1",
            "n": 1,
            "seed": 7,
            "frequency_penalty": 0.5,
            "presence_penalty": 0.1,
            "logprobs": True,
            "top_logprobs": 2,
            "logit_bias": {"50256": -100},
            "metadata": {"a": "b"},
            "service_tier": "flex",
            "store": True,
            "stream_options": {"include_usage": True},
            "modalities": ["text"],
            "response_format": {"type": "text"},
            "reasoning_effort": "low",
            "prompt_cache_key": "k",
            "top_k": 5,
        }
    )
    assert sent == {
        "model": "claude-3-5-haiku-latest",
        "max_tokens": DEFAULT_MAX_TOKENS,
        "messages": [{"role": "user", "content": "hi"}],
        "top_p": 0.9,
        "top_k": 5,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-1"},
    }
    assert translate({"messages": HELLO, "stop": ["a", "b"]})["stop_sequences"] == ["a", "b"]


def test_stream_is_asked_for_when_the_call_streams() -> None:
    assert translate({"messages": HELLO, "stream": True}, stream=True)["stream"] is True
    assert "stream" not in translate({"messages": HELLO, "stream": True})


def test_image_parts_become_base64_or_url_sources() -> None:
    sent = translate(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {
                            "type": "image_url",
                            "image_url": {"url": f"data:image/png;base64,{PIXEL}"},
                        },
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://example.com/a.jpg", "detail": "low"},
                        },
                    ],
                }
            ]
        }
    )
    assert sent["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
    ]


def test_pdf_data_becomes_a_document_and_what_anthropic_cannot_read_is_refused() -> None:
    pdf = {
        "type": "file",
        "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"},
    }
    sent = translate({"messages": [{"role": "user", "content": [pdf]}]})
    assert sent["messages"][0]["content"] == [
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
        }
    ]
    svg = {"type": "image_url", "image_url": {"url": "data:image/svg+xml;base64,PHN2Zz4="}}
    assert refusal({"messages": [{"role": "user", "content": [svg]}]}).client_error.param == (  # type: ignore[union-attr]
        "messages[0].content[0].image_url"
    )
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    assert "input_audio" in refusal({"messages": [{"role": "user", "content": [audio]}]}).message
    file_id = {"type": "file", "file": {"file_id": "file-abc"}}
    assert "file ids" in refusal({"messages": [{"role": "user", "content": [file_id]}]}).message


def test_tools_are_sent_with_their_schema_as_input_schema() -> None:
    sent = translate({"messages": HELLO, "tools": [WEATHER]})
    assert sent["tools"] == [
        {
            "name": "get_weather",
            "description": "The weather in a city",
            "input_schema": WEATHER["function"]["parameters"],
        }
    ]
    assert sent["tool_choice"] == {"type": "auto"}
    bare = {"type": "function", "function": {"name": "now"}}
    assert translate({"messages": HELLO, "tools": [bare]})["tools"] == [
        {"name": "now", "input_schema": {"type": "object", "properties": {}}}
    ]


@pytest.mark.parametrize(
    ("choice", "sent"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "tool", "name": "get_weather"},
        ),
    ],
)
def test_tool_choice_maps_to_anthropics(choice: Any, sent: dict[str, Any]) -> None:
    assert (
        translate({"messages": HELLO, "tools": [WEATHER], "tool_choice": choice})["tool_choice"]
        == sent
    )


def test_parallel_tool_calls_false_disables_parallel_tool_use() -> None:
    body = {"messages": HELLO, "tools": [WEATHER], "parallel_tool_calls": False}
    assert translate(body)["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    body["tool_choice"] = "required"
    assert translate(body)["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


def test_tool_calls_become_tool_use_blocks_and_tool_messages_one_turn_of_results() -> None:
    calls = [
        {
            "id": "toolu_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {
            "id": "toolu_2",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
        },
    ]
    sent = translate(
        {
            "tools": [WEATHER],
            "messages": [
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": "Let me look.", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
                {
                    "role": "tool",
                    "tool_call_id": "toolu_2",
                    "content": [{"type": "text", "text": "rain"}],
                },
                {"role": "user", "content": "And so?"},
            ],
        }
    )
    assert sent["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "toolu_2",
                    "name": "get_weather",
                    "input": {"city": "Rome"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "rain"},
                {"type": "text", "text": "And so?"},
            ],
        },
    ]


def test_tool_call_arguments_that_are_no_json_object_are_refused() -> None:
    call_ = {"id": "t", "type": "function", "function": {"name": "f", "arguments": "[1"}}
    error = refusal(
        {"messages": [*HELLO, {"role": "assistant", "content": None, "tool_calls": [call_]}]}
    )
    assert error.client_error.param == "messages[1].tool_calls[0].function.arguments"  # type: ignore[union-attr]


def test_a_history_of_tool_calls_without_tools_gets_them_declared_and_not_callable() -> None:
    call_ = {"id": "call:1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    sent = translate(
        {
            "messages": [
                *HELLO,
                {"role": "assistant", "content": None, "tool_calls": [call_]},
                {"role": "tool", "tool_call_id": "call:1", "content": "done"},
            ]
        }
    )
    assert sent["tools"] == [{"name": "f", "input_schema": {"type": "object"}}]
    assert sent["tool_choice"] == {"type": "none"}
    # ids as Anthropic takes them, the call and its result alike
    assert sent["messages"][1]["content"][0]["id"] == "call_1"
    assert sent["messages"][2]["content"][0]["tool_use_id"] == "call_1"


def test_a_user_longer_than_anthropics_user_id_is_dropped() -> None:
    assert "metadata" not in translate({"messages": HELLO, "user": "u" * 257})


def test_n_above_one_is_a_400_naming_the_provider() -> None:
    error = refusal({"messages": HELLO, "n": 2})
    assert error.client_error.param == "n" and "n=2" in error.message  # type: ignore[union-attr]
    assert error.client_error.code == "invalid_request"  # type: ignore[union-attr]


def test_a_json_schema_is_a_forced_tool_whose_input_schema_is_the_schema() -> None:
    sent = translate({"messages": HELLO, "response_format": PERSON})
    assert sent["tools"][0]["name"] == "person"
    assert sent["tools"][0]["input_schema"] == PERSON["json_schema"]["schema"]
    assert sent["tool_choice"] == {"type": "tool", "name": "person"}
    with_tools = translate({"messages": HELLO, "response_format": PERSON, "tools": [WEATHER]})
    assert [t["name"] for t in with_tools["tools"]] == ["get_weather", "person"]
    assert with_tools["tool_choice"] == {"type": "any"}  # call a tool, or answer


def test_a_schema_that_is_no_object_is_wrapped_and_unwrapped() -> None:
    schema = {"type": "array", "items": {"$ref": "#/$defs/n"}, "$defs": {"n": {"type": "integer"}}}
    body = {
        "messages": HELLO,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "n s", "schema": schema},
        },
    }
    sent = translate(body)
    assert sent["tools"][0]["name"] == "n_s"
    assert sent["tools"][0]["input_schema"] == {
        "type": "object",
        "properties": {"value": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
        "required": ["value"],
        "$defs": {"n": {"type": "integer"}},
    }
    answer = message_bytes(
        [{"type": "tool_use", "id": "t1", "name": "n_s", "input": {"value": [1, 2]}}], "tool_use"
    )
    parsed = adapter().parse_response(answer, call(body))
    assert parsed.content == "[1,2]" and parsed.finish_reason == "stop"


# -- in process: answers ------------------------------------------------------------------------
def message_bytes(content: list[dict[str, Any]], stop_reason: str, **usage: int) -> bytes:
    return orjson.dumps(
        {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-3-5-haiku",
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5, **usage},
        }
    )


def test_a_text_answer_is_a_chat_completion_with_usage_counting_cache_tokens_as_prompt() -> None:
    body = message_bytes(
        [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}],
        "end_turn",
        cache_read_input_tokens=100,
        cache_creation_input_tokens=20,
    )
    parsed = adapter().parse_response(body, call({"messages": HELLO}))
    answer = ChatCompletion.model_validate(parsed.body)
    assert answer.choices[0].message.content == "Hello there"
    assert answer.choices[0].finish_reason == "stop" and answer.model == "claude-3-5-haiku"
    assert answer.usage is not None and answer.usage.prompt_tokens == 130
    assert answer.usage.completion_tokens == 5 and answer.usage.total_tokens == 135
    assert answer.usage.prompt_tokens_details.cached_tokens == 100  # type: ignore[union-attr]
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens) == (130, 5)  # type: ignore[union-attr]


def test_tool_use_blocks_are_tool_calls_with_json_string_arguments() -> None:
    body = message_bytes(
        [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Oslo"}},
        ],
        "tool_use",
    )
    answer = ChatCompletion.model_validate(
        adapter().parse_response(body, call({"messages": HELLO})).body
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (tool_call,) = choice.message.tool_calls  # type: ignore[misc]
    assert tool_call.id == "toolu_9" and tool_call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(tool_call.function.arguments) == {"city": "Oslo"}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
def test_stop_reasons_map_to_finish_reasons(stop_reason: str, finish: str) -> None:
    body = message_bytes([{"type": "text", "text": "x"}], stop_reason)
    parsed = adapter().parse_response(body, call({"messages": HELLO}))
    assert ChatCompletion.model_validate(parsed.body).choices[0].finish_reason == finish


def test_a_body_without_content_blocks_is_unparseable() -> None:
    with pytest.raises(UpstreamError) as caught:
        adapter().parse_response(b'{"type": "message"}', call({"messages": HELLO}))
    assert caught.value.outcome is Outcome.UNAVAILABLE and caught.value.reason == "bad_body"


def events(*payloads: dict[str, Any]) -> list[tuple[str, bytes]]:
    return [(p["type"], orjson.dumps(p)) for p in payloads]


START = {
    "type": "message_start",
    "message": {
        "id": "msg_02",
        "type": "message",
        "role": "assistant",
        "model": "claude-3-5-haiku",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 5},
    },
}


def decode(body: dict[str, Any], stream: list[tuple[str, bytes]]) -> tuple[Any, list[Any]]:
    decoder = adapter().stream_decoder(call(body, stream=True))
    chunks = [orjson.loads(c) for event, data in stream for c in decoder.feed(event, data)]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    return decoder, chunks


def test_a_stream_becomes_openai_chunks_ending_in_finish_reason_and_usage() -> None:
    stream = events(
        START,
        {"type": "ping"},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
            "usage": {"output_tokens": 12},
        },
        {"type": "message_stop"},
    )
    body = {"messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    decoder, chunks = decode(body, stream)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "Hello"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 30
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    assert {c["id"] for c in chunks} == {"msg_02"} and decoder.finished
    assert (decoder.usage.prompt_tokens, decoder.usage.completion_tokens) == (30, 12)
    _, unasked = decode({"messages": HELLO, "stream": True}, stream)
    assert all(c["choices"] for c in unasked)  # no usage chunk unless the client asked


def test_streamed_tool_uses_are_tool_call_deltas_with_their_own_index() -> None:
    def tool(index: int, name: str, *parts: str) -> list[dict[str, Any]]:
        return [
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {
                    "type": "tool_use",
                    "id": f"toolu_{index}",
                    "name": name,
                    "input": {},
                },
            },
            *(
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": part},
                }
                for part in parts
            ),
            {"type": "content_block_stop", "index": index},
        ]

    stream = events(
        START,
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}},
        {"type": "content_block_stop", "index": 0},
        *tool(1, "get_weather", "", '{"city":', ' "Oslo"}'),
        *tool(2, "get_time", '{"tz": "CET"}'),
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use"},
            "usage": {"output_tokens": 9},
        },
        {"type": "message_stop"},
    )
    _, chunks = decode({"messages": HELLO, "tools": [WEATHER]}, stream)
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for delta in chunk["choices"][0]["delta"].get("tool_calls", []) if chunk["choices"] else []:
            entry = calls.setdefault(delta["index"], {"name": "", "arguments": "", "id": ""})
            entry["id"] = delta.get("id", entry["id"])
            entry["name"] += delta.get("function", {}).get("name", "")
            entry["arguments"] += delta.get("function", {}).get("arguments", "")
    assert calls == {
        0: {"id": "toolu_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        1: {"id": "toolu_2", "name": "get_time", "arguments": '{"tz": "CET"}'},
    }
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_streamed_json_schema_answer_is_streamed_as_content() -> None:
    stream = events(
        START,
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "tool_use", "id": "toolu_1", "name": "person", "input": {}},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": '{"name": "Ada",'},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": ' "age": 36}'},
        },
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use"},
            "usage": {"output_tokens": 9},
        },
        {"type": "message_stop"},
    )
    body = {"messages": HELLO, "response_format": PERSON}
    decoder = adapter().stream_decoder(
        UpstreamCall(
            ProviderSettings("claude", "anthropic", None, None), "c", body, True, keep_content=True
        )
    )
    chunks = [orjson.loads(c) for event, data in stream for c in decoder.feed(event, data)]
    assert decoder.content == '{"name": "Ada", "age": 36}'
    assert all("tool_calls" not in c["choices"][0]["delta"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_the_finish_reason_goes_out_once_even_without_a_stop_reason() -> None:
    text = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}}
    usage_only = {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 2}}
    stream = events(START, text, usage_only, usage_only, {"type": "message_stop"})
    decoder, chunks = decode({"messages": HELLO}, stream)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes == [None, None, "stop"] and decoder.usage.completion_tokens == 2


def test_an_error_event_fails_the_stream_and_waits_for_no_opening_chunk() -> None:
    decoder = adapter().stream_decoder(call({"messages": HELLO}, stream=True))
    assert decoder.feed("message_start", orjson.dumps(START)) == []  # nothing sent yet
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with pytest.raises(UpstreamError) as caught:
        decoder.feed("error", orjson.dumps(error))
    assert caught.value.outcome is Outcome.UNAVAILABLE and "Overloaded" in caught.value.message


def envelope(kind: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


def test_errors_map_onto_outcomes() -> None:
    classify = adapter().classify_error
    overloaded = classify(529, envelope("overloaded_error", "Overloaded"), {})
    assert overloaded.outcome is Outcome.UNAVAILABLE and overloaded.reason == "http_529"
    limited = classify(429, envelope("rate_limit_error", "slow down"), {"retry-after": "3"})
    assert limited.outcome is Outcome.UNAVAILABLE and limited.retry_after == 3.0
    rejected = classify(401, envelope("authentication_error", "invalid x-api-key"), {})
    assert rejected.outcome is Outcome.UNAVAILABLE and rejected.detail == "invalid x-api-key"
    assert classify(403, envelope("permission_error", "no"), {}).outcome is Outcome.UNAVAILABLE
    for message in (
        "prompt is too long: 208310 tokens > 200000 maximum",
        "input length and `max_tokens` exceed context limit: 188240 + 21333 > 200000, "
        "decrease input length or `max_tokens` and try again",
    ):
        long = classify(400, envelope("invalid_request_error", message), {})
        assert long.outcome is Outcome.CONTEXT_LENGTH, message
    fault = classify(400, envelope("invalid_request_error", "messages: bad"), {})
    assert fault.outcome is Outcome.CLIENT_FAULT and fault.client_error is not None
    assert fault.client_error.error_type == "invalid_request_error"
    assert fault.client_error.message == "messages: bad"


def test_check_config_accepts_the_kind(tmp_path: Path) -> None:
    path = tmp_path / "ringside.yaml"
    path.write_text(
        "storage: {backend: memory}\nproviders:\n"
        "  anthropic: {kind: anthropic, api_key_env: ANTHROPIC_API_KEY}\nmodels:\n"
        f"  {HAIKU}: {{input_per_mtok: 0.8, output_per_mtok: 4, max_output: 8192}}\n"
    )
    result = ringside("check-config", str(path), env={"ANTHROPIC_API_KEY": "x"})
    assert result.returncode == 0, result.stderr


# -- end to end: a sidecar in front of the fake Messages API ---------------------------------------
@pytest.fixture(scope="module")
def fake_anthropic() -> Iterator[FakeAnthropic]:
    fake = FakeAnthropic(KEY)
    fake.server.start()
    yield fake
    fake.server.stop()


@pytest.fixture
def claude(fake_anthropic: FakeAnthropic) -> Iterator[FakeAnthropic]:
    fake_anthropic.reset()
    yield fake_anthropic
    assert fake_anthropic.problems() == []  # every request was one the real API takes


@pytest.fixture(scope="module")
def proc(
    fake_anthropic: FakeAnthropic, _openai_server: FakeOpenAI, tmp_path_factory: Any
) -> Iterator[SidecarProcess]:
    model = {
        "input_per_mtok": 0.80,
        "output_per_mtok": 4.00,
        "context": 200000,
        "max_output": 8192,
        "caps": ["tools", "vision", "json_schema"],
    }
    config = without_circuit_breakers(
        {
            "storage": {"backend": "memory"},
            "providers": {
                "anthropic": {
                    "kind": "anthropic",
                    "base_url": fake_anthropic.url,
                    "api_key_env": "TEST_ANTHROPIC_KEY",
                    "timeout": {"connect": 2, "read": 5},
                },
                "openai": {
                    "kind": "openai",
                    "base_url": _openai_server.url,
                    "api_key_env": "TEST_OPENAI_KEY",
                    "timeout": {"connect": 2, "read": 5},
                },
            },
            "models": {
                HAIKU: model,
                MINI: {
                    "input_per_mtok": 0.15,
                    "output_per_mtok": 0.60,
                    "context": 128000,
                    "max_output": 16384,
                },
            },
            "slots": {"chat": [HAIKU, MINI]},
            "customers": {"cached": {"budget": {"usd": 1.0, "period": "month"}}},
        }
    )
    workdir = tmp_path_factory.mktemp("anthropic")
    yield from module_sidecar(workdir, config, {"TEST_ANTHROPIC_KEY": KEY, **ADMIN_ENV})


def chat(proc: SidecarProcess, **body: Any) -> Any:
    return post_chat(proc, {"model": HAIKU, "messages": HELLO, **body})


def test_plain_chat_through_the_openai_sdk(proc: SidecarProcess, claude: FakeAnthropic) -> None:
    claude.script(Reply(text="Bonjour!"))
    answer = sdk(proc).chat.completions.with_raw_response.create(
        model=HAIKU,
        messages=[{"role": "system", "content": "Answer in French."}, *HELLO],
        temperature=1.5,
        top_p=0.9,
        seed=7,
    )
    completion = ChatCompletion.model_validate(json.loads(answer.content))
    assert completion.choices[0].message.content == "Bonjour!"
    assert completion.model == "claude-3-5-haiku-latest"
    assert answer.headers["X-Ringside-Model-Used"] == HAIKU
    sent = claude.last
    assert sent.body["system"] == "Answer in French." and sent.body["max_tokens"] == 8192
    assert sent.body["temperature"] == 1 and "top_p" not in sent.body and "seed" not in sent.body
    assert sent.headers["x-api-key"] == KEY and "Authorization" not in sent.headers


def test_a_stream_validates_chunk_by_chunk(proc: SidecarProcess, claude: FakeAnthropic) -> None:
    claude.script(Reply(text="one two three four", chunks=4, input_tokens=20, output_tokens=6))
    answer = chat(proc, stream=True, stream_options={"include_usage": True})
    assert answer.status == 200
    payloads = sse_events(answer.body)
    assert payloads[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(p) for p in payloads[:-1]]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 20
    assert claude.last.body["stream"] is True

    claude.script(Reply(text="plain"))
    with sdk(proc).chat.completions.create(model=HAIKU, messages=HELLO, stream=True) as stream:
        seen = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in seen if c.choices) == "plain"
    assert all(c.usage is None for c in seen)  # not asked for


def test_a_tool_call_round_trip(proc: SidecarProcess, claude: FakeAnthropic) -> None:
    claude.script(Reply(text="", tool_uses=[ToolUse("get_weather", {"city": "Paris"}, "toolu_a")]))
    client = sdk(proc)
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model=HAIKU, messages=messages, tools=[WEATHER])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (tool_call,) = choice.message.tool_calls  # type: ignore[misc]
    assert json.loads(tool_call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert claude.last.body["tools"][0]["input_schema"]["required"] == ["city"]

    claude.script(Reply(text="It is sunny in Paris."))
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tool_call.id, "content": "sunny, 24 C"},
    ]
    second = client.chat.completions.create(model=HAIKU, messages=messages, tools=[WEATHER])
    assert second.choices[0].message.content == "It is sunny in Paris."
    turns = claude.last.body["messages"]
    assert turns[1] == {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Paris"}}
        ],
    }
    assert turns[2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_a", "content": "sunny, 24 C"}],
    }


def test_a_streamed_tool_call(proc: SidecarProcess, claude: FakeAnthropic) -> None:
    claude.script(
        Reply(
            text="Let me check.",
            tool_uses=[
                ToolUse("get_weather", {"city": "Paris"}),
                ToolUse("get_weather", {"city": "Rome"}),
            ],
        )
    )
    answer = chat(proc, stream=True, tools=[WEATHER])
    chunks = [ChatCompletionChunk.model_validate_json(p) for p in sse_events(answer.body)[:-1]]
    arguments: dict[int, str] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            arguments[delta.index] = arguments.get(delta.index, "") + (
                delta.function.arguments or "" if delta.function else ""
            )
    assert {i: json.loads(a) for i, a in arguments.items()} == {
        0: {"city": "Paris"},
        1: {"city": "Rome"},
    }
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_image_parts_reach_anthropic_as_image_blocks(
    proc: SidecarProcess, claude: FakeAnthropic
) -> None:
    content: Any = [
        {"type": "text", "text": "Compare these."},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    answer = sdk(proc).chat.completions.create(
        model=HAIKU,
        messages=[{"role": "user", "content": content}],
    )
    assert answer.choices[0].message.content
    blocks = claude.last.body["messages"][0]["content"]
    assert [b["source"]["type"] for b in blocks[1:]] == ["base64", "url"]
    assert blocks[1]["source"]["data"] == PIXEL


@pytest.mark.parametrize(
    "reply",
    [
        Reply(status=529, error_type="overloaded_error", error_message="Overloaded"),
        Reply(status=500, error_type="api_error"),
        Reply(status=429, error_type="rate_limit_error", headers={"retry-after": "1"}),
        Reply(status=401, error_type="authentication_error", error_message="invalid x-api-key"),
        Reply(
            status=400,
            error_type="invalid_request_error",
            error_message="prompt is too long: 208310 tokens > 200000 maximum",
        ),
    ],
    ids=["529", "500", "429", "401", "context"],
)
def test_failures_escalate_to_the_next_provider_of_a_cascade(
    proc: SidecarProcess, claude: FakeAnthropic, fake_openai: FakeOpenAI, reply: Reply
) -> None:
    claude.script(reply)
    answer = post_chat(proc, {"model": [HAIKU, MINI], "messages": HELLO})
    assert answer.status == 200, answer.body
    ChatCompletion.model_validate(answer.json())
    assert answer.headers["X-Ringside-Models-Tried"] == f"{HAIKU},{MINI}"
    assert answer.headers["X-Ringside-Fallback-Triggered"] == "true"
    assert fake_openai.models_called() == ["gpt-4o-mini"]


def test_alone_the_failures_are_503_with_retry_after_and_400_for_context(
    proc: SidecarProcess, claude: FakeAnthropic
) -> None:
    claude.script(Reply(status=429, error_type="rate_limit_error", headers={"retry-after": "2"}))
    limited = chat(proc)
    assert limited.status == 503 and limited.error["code"] == "upstream_unavailable"
    assert limited.headers["Retry-After"] == "2"
    claude.script(
        Reply(
            status=400,
            error_type="invalid_request_error",
            error_message="prompt is too long: 208310 tokens > 200000 maximum",
        )
    )
    long = chat(proc)
    assert long.status == 400 and long.error["code"] == "context_length_exceeded"


def test_a_request_anthropic_refuses_is_the_clients_fault_and_does_not_escalate(
    proc: SidecarProcess, claude: FakeAnthropic, fake_openai: FakeOpenAI
) -> None:
    claude.script(
        Reply(
            status=400, error_type="invalid_request_error", error_message="messages.0.content: bad"
        )
    )
    answer = post_chat(proc, {"model": [HAIKU, MINI], "messages": HELLO})
    assert answer.status == 400 and answer.error["message"] == "messages.0.content: bad"
    assert fake_openai.models_called() == []


def test_an_error_before_the_first_chunk_escalates_a_streamed_slot(
    proc: SidecarProcess, claude: FakeAnthropic, fake_openai: FakeOpenAI
) -> None:
    claude.script(Reply(text="", error_after_chunks=0))
    answer = post_chat(proc, {"model": "slot:chat", "messages": HELLO, "stream": True})
    assert answer.status == 200
    assert answer.headers["X-Ringside-Model-Used"] == MINI
    assert fake_openai.models_called() == ["gpt-4o-mini"]


def test_an_error_event_mid_stream_ends_the_stream_with_an_sse_error(
    proc: SidecarProcess, claude: FakeAnthropic
) -> None:
    claude.script(Reply(text="one two three", chunks=3, error_after_chunks=2))
    answer = chat(proc, stream=True)
    payloads = sse_events(answer.body)
    last = json.loads(payloads[-1])
    assert "error" in last and "Overloaded" in last["error"]["message"]
    chunks = [ChatCompletionChunk.model_validate_json(p) for p in payloads[:-1]]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "one two th"


def test_structured_output_through_the_forced_tool_with_one_reprompt(
    proc: SidecarProcess, claude: FakeAnthropic
) -> None:
    claude.script(
        Reply(text="", tool_uses=[ToolUse("person", {"name": "Ada"})]),
        Reply(text="", tool_uses=[ToolUse("person", {"name": "Ada", "age": 36})]),
    )
    answer = post_chat(proc, {"model": HAIKU, "messages": HELLO, "response_format": PERSON})
    assert answer.status == 200, answer.body
    completion = ChatCompletion.model_validate(answer.json())
    assert json.loads(completion.choices[0].message.content or "") == {"name": "Ada", "age": 36}
    assert completion.choices[0].finish_reason == "stop"
    assert answer.headers["X-Ringside-Schema-Reprompts"] == "1"
    first, second = claude.received
    assert first.body["tool_choice"] == {"type": "tool", "name": "person"}
    assert first.body["tools"][0]["input_schema"] == PERSON["json_schema"]["schema"]
    assert second.body["messages"][1] == {"role": "assistant", "content": '{"name":"Ada"}'}
    assert "age" in second.body["messages"][2]["content"]


def test_a_streamed_structured_answer_streams_the_tools_input_as_content(
    proc: SidecarProcess, claude: FakeAnthropic
) -> None:
    claude.script(Reply(text="", tool_uses=[ToolUse("person", {"name": "Ada", "age": 36})]))
    answer = chat(proc, stream=True, response_format=PERSON)
    payloads = sse_events(answer.body)
    assert payloads[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(p) for p in payloads[:-1]]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(text) == {"name": "Ada", "age": 36}
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(not c.choices[0].delta.tool_calls for c in chunks if c.choices)

    claude.script(Reply(text="", tool_uses=[ToolUse("person", {"name": "Ada"})]))
    failed = chat(proc, stream=True, response_format=PERSON)
    last = json.loads(sse_events(failed.body)[-1])
    assert last["error"]["code"] == "response_schema_validation_failed"


def test_json_object_takes_the_instruction_path(
    proc: SidecarProcess, claude: FakeAnthropic
) -> None:
    claude.script(Reply(text='```json\n{"ok": true}\n```'))
    answer = chat(proc, response_format={"type": "json_object"})
    assert answer.status == 200 and json.loads(answer.json()["choices"][0]["message"]["content"])
    sent = claude.last.body
    assert "tools" not in sent and "JSON" in sent["system"]


def test_n_of_two_is_a_400_naming_the_provider(proc: SidecarProcess, claude: FakeAnthropic) -> None:
    answer = chat(proc, n=2)
    assert answer.status == 400 and answer.error["param"] == "n"
    assert "'anthropic'" in answer.error["message"] and "n=2" in answer.error["message"]
    assert claude.received == []


def test_usage_and_cost_count_cache_tokens_as_input(
    proc: SidecarProcess, claude: FakeAnthropic
) -> None:
    claude.script(Reply(input_tokens=100, cache_read=1000, cache_creation=500, output_tokens=50))
    answer = post_chat(proc, {"model": HAIKU, "messages": HELLO}, {"FC-Customer": "cached"})
    usage = answer.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (1600, 50)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 1000}
    # 1600 x $0.80/M + 50 x $4.00/M
    assert nano(float(answer.headers["X-Ringside-Cost-USD"])) == 1_480_000
    report = settled_usage(proc, "cached", 1)
    assert report["tokens"] == {"input": 1600, "output": 50, "total": 1650}
    assert nano(report["cost_usd"]) == 1_480_000
