"""The Responses API's translation onto chat and back, without a server: a request's items as
chat messages, a chat answer as a `response` object, chat chunks as Responses events — each
answer and event validated by the official SDK's models."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from sidecar.errors import GatewayError
from sidecar.providers.base import Completion, Usage
from sidecar.responses_answer import from_completion
from sidecar.responses_request import check, to_chat
from sidecar.responses_stream import ChatEvents, NativeEvents, replay
from tests.openai_schemas import check_event, check_response

EVENTS = TypeAdapter(ResponseStreamEvent)


def decoded(frames: list[bytes]) -> list[dict[str, Any]]:
    """Each SSE frame's data, checked against its `event:` name and the SDK's event types."""
    events = []
    for frame in frames:
        head, data = frame.decode().rstrip("\n").split("\n", 1)
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}"
        EVENTS.validate_python(event)
        check_event(event)  # OpenAI's own schema too
        events.append(event)
    return events


def test_instructions_come_first_and_a_string_input_is_a_user_message() -> None:
    call = to_chat({"model": "fc:x/y", "input": "hi", "instructions": "Be kind."})
    assert call.chat["messages"] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "hi"},
    ]
    assert call.native_only is None


def test_a_turn_with_text_and_calls_is_one_assistant_message() -> None:
    chat = to_chat(
        {
            "model": "fc:x/y",
            "input": [
                {"role": "user", "content": "weather in Paris and Oslo?"},
                {"role": "assistant", "content": "Let me look."},
                {"type": "function_call", "call_id": "a", "name": "w", "arguments": "{}"},
                {"type": "function_call", "call_id": "b", "name": "w", "arguments": "{}"},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "function_call_output", "call_id": "a", "output": "sun"},
                {
                    "type": "function_call_output",
                    "call_id": "b",
                    "output": [{"type": "input_text", "text": "rain"}],
                },
            ],
        }
    ).chat
    assistant = chat["messages"][1]
    assert assistant["content"] == "Let me look."
    assert [c["id"] for c in assistant["tool_calls"]] == ["a", "b"]
    assert chat["messages"][2:] == [
        {"role": "tool", "tool_call_id": "a", "content": "sun"},
        {"role": "tool", "tool_call_id": "b", "content": "rain"},
    ]


def test_tools_choice_format_and_cap_are_translated() -> None:
    chat = to_chat(
        {
            "model": "fc:x/y",
            "input": "x",
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"},
            "parallel_tool_calls": False,
            "text": {"format": {"type": "json_object"}},
            "max_output_tokens": 64,
            "reasoning": {"effort": "high"},
            "metadata": {"a": "b"},
            "stream": True,
        }
    ).chat
    assert chat["tools"] == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert chat["parallel_tool_calls"] is False
    assert chat["response_format"] == {"type": "json_object"}
    assert chat["max_completion_tokens"] == 64
    assert chat["stream_options"] == {"include_usage": True}
    assert "reasoning" not in chat and "metadata" not in chat


def test_allowed_tools_keeps_its_mode() -> None:
    choice = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function"}]}
    call = to_chat(
        {
            "model": "fc:x/y",
            "input": "x",
            "tools": [{"type": "function", "name": "f"}],
            "tool_choice": choice,
        }
    )
    assert call.chat["tool_choice"] == "required" and call.native_only is None


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"store": True}, "store"),
        ({"store": False}, None),
        ({"background": False}, None),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0]",
        ),
    ],
)
def test_what_only_the_native_api_takes_is_named(extra: dict[str, Any], param: str | None) -> None:
    call = to_chat({"model": "fc:x/y", "input": "x", **extra})
    assert (call.native_only[0] if call.native_only else None) == param


def test_previous_response_id_allows_no_input() -> None:
    check({"model": "fc:x/y", "previous_response_id": "resp_1"})
    with pytest.raises(GatewayError) as caught:
        check({"model": "fc:x/y"})
    assert caught.value.param == "input"


def completion(message: dict[str, Any], finish: str = "stop", **usage: Any) -> Completion:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m-1",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, **usage},
    }
    return Completion(body, Usage(5, 3))


def test_an_answer_with_text_and_calls_becomes_items() -> None:
    message = {
        "role": "assistant",
        "content": "Looking.",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    request = {"model": "fc:x/y", "input": "x", "temperature": 0.5, "user": "u1"}
    data = from_completion(
        request, completion(message, "tool_calls", prompt_tokens_details={"cached_tokens": 2})
    )
    answer = Response.model_validate(data)
    check_response(data)
    assert [item.type for item in answer.output] == ["message", "function_call"]
    assert answer.output_text == "Looking."
    assert answer.model == "m-1" and answer.created_at == 1700000000
    assert answer.temperature == 0.5 and answer.user == "u1"
    assert answer.usage is not None and answer.usage.input_tokens_details.cached_tokens == 2


@pytest.mark.parametrize(
    ("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")]
)
def test_a_cut_answer_is_incomplete(finish: str, reason: str) -> None:
    data = from_completion({"model": "m"}, completion({"content": "par"}, finish))
    answer = Response.model_validate(data)
    check_response(data)
    assert answer.status == "incomplete"
    assert answer.incomplete_details is not None and answer.incomplete_details.reason == reason


def test_a_refusal_is_a_refusal_part() -> None:
    data = from_completion({"model": "m"}, completion({"content": None, "refusal": "No."}))
    part = Response.model_validate(data).output[0].content[0]  # type: ignore[union-attr]
    assert part.type == "refusal" and part.refusal == "No."


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return orjson.dumps({"id": "c", "model": "m-2", "choices": choices, **extra})


def test_chat_chunks_become_responses_events() -> None:
    stream = ChatEvents({"model": "fc:x/y"}, "resp_1", 1)
    frames = stream.feed([chunk({"role": "assistant", "content": ""})])
    frames += stream.feed([chunk({"content": "Hel"}), chunk({"content": "lo"})])
    frames += stream.feed(
        [
            chunk(
                {
                    "tool_calls": [
                        {"index": 0, "id": "c1", "function": {"name": "f", "arguments": '{"a"'}}
                    ]
                }
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}),
            chunk(
                {
                    "tool_calls": [
                        {"index": 1, "id": "c2", "function": {"name": "g", "arguments": "{}"}}
                    ]
                }
            ),
            chunk({}, "tool_calls"),
            chunk(usage={"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13}),
        ]
    )
    frames += stream.finish()
    events = decoded(frames)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = Response.model_validate(events[-1]["response"])
    assert events[-1]["type"] == "response.completed"
    assert [item.type for item in final.output] == ["message", "function_call", "function_call"]
    assert final.output_text == "Hello"
    assert final.output[1].arguments == '{"a":1}'  # type: ignore[union-attr]
    assert final.model == "m-2"
    assert final.usage is not None and final.usage.output_tokens == 9
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [e["arguments"] for e in done] == ['{"a":1}', "{}"]


def test_a_replayed_response_has_every_event() -> None:
    message = {
        "content": "Hi",
        "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    final = from_completion({"model": "m"}, completion(message))
    events = decoded(replay(final))
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] == "response.completed"
    assert [e["type"] for e in events].count("response.output_item.done") == 2


def test_a_native_failure_before_any_response_event_is_an_error_event() -> None:
    events = decoded(NativeEvents({}, "resp_x", 1).fail("upstream_unavailable", "gone"))
    assert [e["type"] for e in events] == ["error"]


def test_an_inline_file_is_a_chat_file_part() -> None:
    part = {
        "type": "input_file",
        "filename": "a.pdf",
        "file_data": "data:application/pdf;base64,AA",
    }
    call = to_chat({"model": "fc:x/y", "input": [{"role": "user", "content": [part]}]})
    assert call.chat["messages"][0]["content"] == [
        {"type": "file", "file": {"file_data": part["file_data"], "filename": "a.pdf"}}
    ]
    assert call.native_only is None


def test_an_empty_input_is_refused_unless_a_conversation_goes_on() -> None:
    with pytest.raises(GatewayError) as caught:
        check({"model": "fc:x/y", "input": []})
    assert caught.value.param == "input"
    check({"model": "fc:x/y", "input": [], "conversation": "conv_1"})
