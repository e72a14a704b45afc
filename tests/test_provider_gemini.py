"""The `gemini` kind: OpenAI chat ⇄ Gemini generateContent, both ways.

In process: the adapter's pure translation (every body it builds is checked against the official
`google-genai` SDK's types, as the fake does). End to end: a sidecar process in front of the fake
Gemini API (tests/upstreams/gemini_fake.py), called with the official `openai` SDK, every answer
validated as an OpenAI `chat.completion` / `chat.completion.chunk`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from sidecar.errors import Outcome, UpstreamError
from sidecar.providers import ADAPTERS, provider_problems
from sidecar.providers.base import UpstreamCall
from sidecar.providers.gemini import GeminiAdapter
from sidecar.providers.gemini_request import SIGNATURE_PLACEHOLDER
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
from tests.upstreams.gemini_fake import Call, FakeGemini, Reply, request_problems
from tests.upstreams.openai_fake import FakeOpenAI

KEY = "AIza-test-gemini-provider-key"
FLASH = "fc:gemini/gemini-2.5-flash"
MINI = "fc:openai/gpt-4o-mini"
HELLO = [{"role": "user", "content": "hi"}]
PIXEL = (  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4"
    "nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="
)
SIGNATURE = base64.b64encode(b"an opaque thought signature").decode()
WEATHER = {
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
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}


# -- in process: the translation ----------------------------------------------------------------
def settings(**given: Any) -> ProviderSettings:
    fields: dict[str, Any] = {
        "name": "gemini", "kind": "gemini", "base_url": None, "api_key_env": "GEMINI_API_KEY",
        "api_key": KEY, **given,
    }  # fmt: skip
    return ProviderSettings(**fields)


def adapter(**given: Any) -> GeminiAdapter:
    return GeminiAdapter(settings(**given))


def call(
    body: dict[str, Any], *, stream: bool = False, keep: bool = False, max_output: int | None = None
) -> UpstreamCall:
    return UpstreamCall(
        settings(), "gemini-2.5-flash", {"model": FLASH, **body}, stream, keep_content=keep,
        max_output=max_output,
    )  # fmt: skip


def translate(body: dict[str, Any], **options: Any) -> dict[str, Any]:
    """The generateContent body for `body`, after checking the SDK's types take it."""
    raw = adapter().build_request(call(body, **options)).body
    assert request_problems(raw) == []
    return orjson.loads(raw)  # type: ignore[no-any-return]


def refusal(body: dict[str, Any]) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        adapter().build_request(call(body))
    error = caught.value
    assert error.outcome is Outcome.CLIENT_FAULT and error.client_error is not None
    assert error.client_error.status == 400 and "'gemini'" in error.message
    return error


def test_the_kind_is_registered_with_its_capabilities() -> None:
    built = ADAPTERS["gemini"](settings())
    assert built.caps.names() == {
        "tools", "vision", "json_schema", "json_object", "usage_in_stream", "n", "embeddings",
    }  # fmt: skip
    assert built.native_json_schema and built.json_mode


def test_requests_go_to_generate_content_with_the_key_in_x_goog_api_key() -> None:
    request = adapter().build_request(call({"messages": HELLO}))
    assert request.url == (
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
    )
    assert request.headers["x-goog-api-key"] == KEY and "Authorization" not in request.headers
    streamed = adapter().build_request(call({"messages": HELLO}, stream=True))
    assert streamed.url.endswith("/models/gemini-2.5-flash:streamGenerateContent?alt=sse")
    own = adapter(base_url="http://127.0.0.1:9/", api_version="v1", headers={"x-extra": "1"})
    request = own.build_request(call({"messages": HELLO}))
    assert request.url == "http://127.0.0.1:9/v1/models/gemini-2.5-flash:generateContent"
    assert request.headers["x-extra"] == "1"


def test_a_model_id_with_a_slash_is_a_resource_name() -> None:
    request = adapter().build_request(
        UpstreamCall(settings(), "tunedModels/my-model-1", {"messages": HELLO})
    )
    assert request.url.endswith("/v1beta/tunedModels/my-model-1:generateContent")


def test_settings_problems_name_a_missing_key_and_an_unknown_api_version() -> None:
    assert provider_problems(settings()) == []
    assert provider_problems(settings(api_key_env=None, api_key=None))[0][0] == ""
    assert provider_problems(settings(api_key_env=None, headers={"x-goog-api-key": "k"})) == []
    assert [key for key, _ in provider_problems(settings(api_version="v2"))] == ["api_version"]


def test_system_and_developer_messages_become_the_system_instruction() -> None:
    sent = translate(
        {"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
            {"role": "user", "content": "hi"},
        ]}
    )  # fmt: skip
    assert sent["systemInstruction"] == {"parts": [{"text": "Be brief."}, {"text": "Use French."}]}
    assert sent["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]


def test_only_system_text_is_sent_as_a_user_turn() -> None:
    sent = translate({"messages": [{"role": "system", "content": "Say hi."}]})
    assert sent["contents"] == [{"role": "user", "parts": [{"text": "Say hi."}]}]
    assert "systemInstruction" not in sent


def test_assistant_turns_are_model_turns_and_consecutive_turns_merge() -> None:
    sent = translate(
        {"messages": [
            {"role": "user", "content": "one"},
            {"role": "user", "content": [{"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "three"},
            {"role": "user", "content": "four"},
        ]}
    )  # fmt: skip
    assert sent["contents"] == [
        {"role": "user", "parts": [{"text": "one"}, {"text": "two"}]},
        {"role": "model", "parts": [{"text": "three"}]},
        {"role": "user", "parts": [{"text": "four"}]},
    ]


def test_generation_parameters_are_translated_and_the_rest_dropped() -> None:
    sent = translate(
        {"messages": HELLO, "temperature": 1.5, "top_p": 0.9, "top_k": 40, "max_tokens": 300,
         "max_completion_tokens": 200, "stop": "END", "n": 2, "seed": 7,
         "presence_penalty": 0.5, "frequency_penalty": -0.5, "user": "u-1", "logprobs": True,
         "top_logprobs": 2, "logit_bias": {"1": 1}, "metadata": {"a": "b"}, "store": True,
         "service_tier": "auto", "parallel_tool_calls": False, "reasoning_effort": "low",
         "stream_options": {"include_usage": True}, "response_format": {"type": "text"}}
    )  # fmt: skip
    assert set(sent) == {"contents", "generationConfig"}
    assert sent["generationConfig"] == {
        "temperature": 1.5, "topP": 0.9, "topK": 40, "maxOutputTokens": 200,
        "stopSequences": ["END"], "candidateCount": 2, "seed": 7, "presencePenalty": 0.5,
        "frequencyPenalty": -0.5,
    }  # fmt: skip
    assert translate({"messages": HELLO, "stop": ["a", "b"]})["generationConfig"] == {
        "stopSequences": ["a", "b"]
    }
    assert "generationConfig" not in translate({"messages": HELLO, "n": 1})


def test_max_tokens_is_at_most_the_catalogs_max_output_and_not_sent_unasked() -> None:
    body = {"messages": HELLO, "max_tokens": 100000}
    assert translate(body, max_output=65536)["generationConfig"]["maxOutputTokens"] == 65536
    assert translate(body)["generationConfig"]["maxOutputTokens"] == 100000
    assert "generationConfig" not in translate({"messages": HELLO}, max_output=65536)


def test_a_seed_beyond_32_bits_is_refused_naming_the_parameter() -> None:
    assert translate({"messages": HELLO, "seed": -(2**31)})["generationConfig"]["seed"] == -(2**31)
    error = refusal({"messages": HELLO, "seed": 2**31})
    assert error.client_error is not None and error.client_error.param == "seed"


def test_response_formats_become_response_mime_type_and_json_schema() -> None:
    config = translate({"messages": HELLO, "response_format": PERSON})["generationConfig"]
    assert config == {"responseMimeType": "application/json", "responseJsonSchema": PERSON_SCHEMA}
    json_object = translate({"messages": HELLO, "response_format": {"type": "json_object"}})
    assert json_object["generationConfig"] == {"responseMimeType": "application/json"}


def test_images_become_inline_data_or_file_data() -> None:
    sent = translate(
        {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}},
            {"type": "image_url",
             "image_url": {"url": "https://example.com/a.jpg?x=1", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "gs://bucket/scan"}},
        ]}]}
    )  # fmt: skip
    assert sent["contents"][0]["parts"][1:] == [
        {"inlineData": {"mimeType": "image/png", "data": PIXEL}},
        {"fileData": {"fileUri": "https://example.com/a.jpg?x=1", "mimeType": "image/jpeg"}},
        {"fileData": {"fileUri": "gs://bucket/scan"}},
    ]


def test_audio_and_file_data_become_inline_data_and_file_ids_are_refused() -> None:
    sent = translate(
        {"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": PIXEL, "format": "mp3"}},
            {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{PIXEL}",
                                      "filename": "a.pdf"}},
        ]}]}
    )  # fmt: skip
    assert sent["contents"][0]["parts"] == [
        {"inlineData": {"mimeType": "audio/mp3", "data": PIXEL}},
        {"inlineData": {"mimeType": "application/pdf", "data": PIXEL}},
    ]
    error = refusal(
        {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f-1"}}]}]}
    )
    assert error.client_error is not None
    assert error.client_error.param == "messages[0].content[0].file"
    ftp = {"type": "image_url", "image_url": {"url": "ftp://x/a.png"}}
    refusal({"messages": [{"role": "user", "content": [ftp]}]})


def test_tools_become_function_declarations_with_their_json_schema() -> None:
    bare = {"type": "function", "function": {"name": "now"}}
    sent = translate({"messages": HELLO, "tools": [WEATHER, bare]})
    assert sent["tools"] == [{"functionDeclarations": [
        {"name": "get_weather", "description": "The weather in a city",
         "parametersJsonSchema": WEATHER["function"]["parameters"]},  # type: ignore[index]
        {"name": "now"},
    ]}]  # fmt: skip
    assert "toolConfig" not in sent
    refusal({"messages": HELLO, "tools": [{"type": "custom", "custom": {"name": "x"}}]})


@pytest.mark.parametrize(
    ("choice", "config"),
    [
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        ({"type": "function", "function": {"name": "get_weather"}},
         {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}),
        ({"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
            {"type": "function", "function": {"name": "get_weather"}}]}},
         {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}),
    ],
)  # fmt: skip
def test_tool_choice_becomes_the_function_calling_config(choice: Any, config: Any) -> None:
    sent = translate({"messages": HELLO, "tools": [WEATHER], "tool_choice": choice})
    assert sent["toolConfig"] == {"functionCallingConfig": config}


def test_allowed_tools_in_auto_mode_offers_only_those_functions() -> None:
    other = {"type": "function", "function": {"name": "get_time"}}
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
        {"type": "function", "function": {"name": "get_time"}}]}}  # fmt: skip
    sent = translate({"messages": HELLO, "tools": [WEATHER, other], "tool_choice": choice})
    assert sent["tools"] == [{"functionDeclarations": [{"name": "get_time"}]}]
    assert "toolConfig" not in sent
    none_known = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}
    sent = translate({"messages": HELLO, "tools": [WEATHER], "tool_choice": none_known})
    assert "tools" not in sent and "toolConfig" not in sent


def test_tool_calls_and_results_become_function_calls_and_named_responses() -> None:
    sent = translate(
        {"messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "extra_content": {"google": {"thought_signature": SIGNATURE}},
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
            {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
            {"role": "user", "content": "Thanks."},
        ], "tools": [WEATHER]}
    )  # fmt: skip
    model, results = sent["contents"][1], sent["contents"][2]
    assert model == {"role": "model", "parts": [
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"},
         "thoughtSignature": SIGNATURE},
        {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}, "id": "call_2"}},
    ]}  # fmt: skip
    assert results == {"role": "user", "parts": [
        {"functionResponse": {"id": "call_1", "name": "get_weather",
                              "response": {"sky": "sunny"}}},
        {"functionResponse": {"id": "call_2", "name": "get_weather",
                              "response": {"output": "rain"}}},
        {"text": "Thanks."},
    ]}  # fmt: skip


def test_calls_without_a_signature_get_googles_placeholder_on_the_first() -> None:
    calls = [
        {"id": f"call_{i}", "type": "function",
         "function": {"name": "get_weather", "arguments": "{}"}}
        for i in (1, 2)
    ]  # fmt: skip
    sent = translate(
        {"messages": [HELLO[0], {"role": "assistant", "content": "Checking.", "tool_calls": calls},
                      {"role": "tool", "tool_call_id": "call_1", "content": "a"},
                      {"role": "tool", "tool_call_id": "call_2", "content": "b"}]}
    )  # fmt: skip
    parts = sent["contents"][1]["parts"]
    assert parts[0] == {"text": "Checking."}
    assert parts[1]["thoughtSignature"] == SIGNATURE_PLACEHOLDER
    assert "thoughtSignature" not in parts[2]


def test_a_tool_result_without_its_call_is_refused() -> None:
    error = refusal(
        {"messages": [HELLO[0], {"role": "tool", "tool_call_id": "c9", "content": "x"}]}
    )
    assert error.client_error is not None
    assert error.client_error.param == "messages[1].tool_call_id"


def test_legacy_function_messages_are_translated() -> None:
    sent = translate(
        {"messages": [
            HELLO[0],
            {"role": "assistant", "content": None,
             "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"role": "function", "name": "get_weather", "content": "snow"},
        ]}
    )  # fmt: skip
    assert sent["contents"][1]["parts"][0]["functionCall"] == {
        "name": "get_weather", "args": {"city": "Oslo"},
    }  # fmt: skip
    assert sent["contents"][2]["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"output": "snow"}}}
    ]


def test_tool_call_arguments_that_are_no_json_object_are_refused() -> None:
    error = refusal(
        {"messages": [HELLO[0], {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]}
    )  # fmt: skip
    assert error.client_error is not None
    assert error.client_error.param == "messages[1].tool_calls[0].function.arguments"


# -- in process: answers --------------------------------------------------------------------------
def answer(data: dict[str, Any], body: dict[str, Any] | None = None) -> dict[str, Any]:
    completion = adapter().parse_response(orjson.dumps(data), call(body or {"messages": HELLO}))
    ChatCompletion.model_validate(completion.body)
    return completion.body


def candidate(*parts: dict[str, Any], reason: str = "STOP", index: int = 0) -> dict[str, Any]:
    return {"content": {"role": "model", "parts": list(parts)}, "finishReason": reason,
            "index": index}  # fmt: skip


USAGE = {
    "promptTokenCount": 30, "candidatesTokenCount": 12, "thoughtsTokenCount": 100,
    "cachedContentTokenCount": 20, "toolUsePromptTokenCount": 5, "totalTokenCount": 147,
}  # fmt: skip


def test_an_answer_becomes_a_chat_completion_with_usage() -> None:
    body = answer(
        {"candidates": [candidate({"text": "thinking...", "thought": True}, {"text": "Hel"},
                                  {"text": "lo"})],
         "usageMetadata": USAGE, "modelVersion": "gemini-2.5-flash-001", "responseId": "r-1"}
    )  # fmt: skip
    assert body["id"] == "r-1" and body["model"] == "gemini-2.5-flash-001"
    assert body["choices"][0]["message"]["content"] == "Hello"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": 35, "completion_tokens": 112, "total_tokens": 147,
        "prompt_tokens_details": {"cached_tokens": 20},
        "completion_tokens_details": {"reasoning_tokens": 100},
    }  # fmt: skip


def test_function_calls_become_tool_calls_with_ids_and_signatures() -> None:
    body = answer(
        {"candidates": [candidate(
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": "g-1"},
             "thoughtSignature": SIGNATURE},
            {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
        )]}
    )  # fmt: skip
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    first, second = choice["message"]["tool_calls"]
    assert first["id"] == "g-1" and json.loads(first["function"]["arguments"]) == {"city": "Paris"}
    assert first["extra_content"] == {"google": {"thought_signature": SIGNATURE}}
    assert second["id"].startswith("call_") and "extra_content" not in second
    assert "usage" not in body


@pytest.mark.parametrize(
    ("reason", "finish"),
    [("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"),
     ("RECITATION", "content_filter"), ("BLOCKLIST", "content_filter"),
     ("PROHIBITED_CONTENT", "content_filter"), ("SPII", "content_filter"), ("OTHER", "stop"),
     ("MALFORMED_FUNCTION_CALL", "stop"), ("SOMETHING_NEW", "stop")],
)  # fmt: skip
def test_finish_reasons_map_onto_openais(reason: str, finish: str) -> None:
    body = answer({"candidates": [candidate({"text": "x"}, reason=reason)]})
    assert body["choices"][0]["finish_reason"] == finish


def test_candidates_are_choices_by_index() -> None:
    body = answer(
        {"candidates": [candidate({"text": "b"}, index=1), candidate({"text": "a"}, index=0)]},
        {"messages": HELLO, "n": 2},
    )
    assert [(c["index"], c["message"]["content"]) for c in body["choices"]] == [(0, "a"), (1, "b")]


def test_a_blocked_prompt_is_a_content_filter_refusal() -> None:
    body = answer({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": USAGE})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] is None
    assert "SAFETY" in choice["message"]["refusal"]


@pytest.mark.parametrize("raw", [b"not json", b"[]", b"{}", b'{"candidates": []}'])
def test_an_unreadable_answer_escalates(raw: bytes) -> None:
    with pytest.raises(UpstreamError) as caught:
        adapter().parse_response(raw, call({"messages": HELLO}))
    assert caught.value.outcome is Outcome.UNAVAILABLE


# -- in process: streams --------------------------------------------------------------------------
def decode(body: dict[str, Any], events: list[dict[str, Any]], **options: Any) -> tuple[Any, Any]:
    decoder = adapter().stream_decoder(call(body, stream=True, **options))
    chunks = [orjson.loads(c) for e in events for c in decoder.feed(None, orjson.dumps(e))]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    return decoder, chunks


def event(*parts: dict[str, Any], reason: str | None = None, usage: Any = None) -> dict[str, Any]:
    cand: dict[str, Any] = {"content": {"role": "model", "parts": list(parts)}, "index": 0}
    if reason:
        cand["finishReason"] = reason
    data: dict[str, Any] = {"candidates": [cand], "responseId": "r-2", "modelVersion": "g-1"}
    if usage:
        data["usageMetadata"] = usage
    return data


def test_a_stream_becomes_chunks_with_the_last_cumulative_usage() -> None:
    events = [
        event({"text": "Hel"}, usage={"promptTokenCount": 30, "candidatesTokenCount": 1}),
        event({"text": "lo"}, usage={"promptTokenCount": 30, "candidatesTokenCount": 2}),
        event({"text": "!"}, reason="MAX_TOKENS", usage={"promptTokenCount": 30,
                                                         "candidatesTokenCount": 3}),
    ]  # fmt: skip
    body = {"messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    decoder, chunks = decode(body, events, keep=True)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "Hello!"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert {c["id"] for c in chunks} == {"r-2"} and decoder.finished
    assert (decoder.usage.prompt_tokens, decoder.usage.completion_tokens) == (30, 3)
    assert decoder.content == "Hello!"
    _, unasked = decode({"messages": HELLO, "stream": True}, events)
    assert all(c["choices"] for c in unasked)


def test_a_streamed_function_call_is_one_whole_tool_call_delta() -> None:
    events = [
        event({"text": "Let me check."}),
        event({"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
               "thoughtSignature": SIGNATURE},
              {"functionCall": {"name": "get_time", "args": {}}}, reason="STOP"),
    ]  # fmt: skip
    _, chunks = decode({"messages": HELLO, "tools": [WEATHER]}, events)
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [(d["index"], d["function"]["name"], d["function"]["arguments"]) for d in deltas] == [
        (0, "get_weather", '{"city":"Paris"}'), (1, "get_time", "{}"),
    ]  # fmt: skip
    assert all(d["id"].startswith("call_") for d in deltas)
    assert deltas[0]["extra_content"] == {"google": {"thought_signature": SIGNATURE}}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_stream_of_several_candidates_finishes_when_each_has() -> None:
    def two(reason: str | None) -> dict[str, Any]:
        data = event({"text": "a"}, reason=reason)
        other = {**data["candidates"][0], "index": 1}
        data["candidates"].append(other)
        return data

    decoder, _ = decode({"messages": HELLO, "n": 2}, [two(None)])
    assert not decoder.finished
    decoder.feed(None, orjson.dumps(two("STOP")))
    assert decoder.finished


def test_an_error_event_fails_the_stream() -> None:
    decoder = adapter().stream_decoder(call({"messages": HELLO}, stream=True))
    error = {"error": {"code": 500, "message": "An internal error has occurred.",
                       "status": "INTERNAL"}}  # fmt: skip
    with pytest.raises(UpstreamError) as caught:
        decoder.feed(None, orjson.dumps(error))
    assert caught.value.outcome is Outcome.UNAVAILABLE and "internal" in caught.value.message


def test_a_blocked_prompt_in_a_stream_finishes_it() -> None:
    decoder, chunks = decode({"messages": HELLO}, [{"promptFeedback": {"blockReason": "OTHER"}}])
    assert decoder.finished and chunks[-1]["choices"][0]["finish_reason"] == "content_filter"


# -- in process: errors ---------------------------------------------------------------------------
def envelope(code: int, status: str, message: str, *details: dict[str, Any]) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = list(details)
    return orjson.dumps({"error": error})


RETRY = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "21s"}
KEY_INVALID = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
               "domain": "googleapis.com"}  # fmt: skip


def test_errors_map_onto_outcomes_by_their_status() -> None:
    classify = adapter().classify_error
    limited = classify(429, envelope(429, "RESOURCE_EXHAUSTED", "Quota exceeded", RETRY), {})
    assert limited.outcome is Outcome.UNAVAILABLE and limited.retry_after == 21.0
    assert limited.status == 429
    header = classify(429, envelope(429, "RESOURCE_EXHAUSTED", "q", RETRY), {"Retry-After": "2"})
    assert header.retry_after == 2.0
    for code, status in ((503, "UNAVAILABLE"), (500, "INTERNAL"), (504, "DEADLINE_EXCEEDED")):
        assert classify(code, envelope(code, status, "x"), {}).outcome is Outcome.UNAVAILABLE
    for code, status in ((401, "UNAUTHENTICATED"), (403, "PERMISSION_DENIED")):
        rejected = classify(code, envelope(code, status, "denied"), {})
        assert rejected.outcome is Outcome.UNAVAILABLE and rejected.detail == "denied"
    key = classify(400, envelope(400, "INVALID_ARGUMENT", "API key not valid.", KEY_INVALID), {})
    assert key.outcome is Outcome.UNAVAILABLE and key.detail == "API key not valid."
    where = classify(
        400, envelope(400, "FAILED_PRECONDITION", "User location is not supported"), {}
    )
    assert where.outcome is Outcome.UNAVAILABLE
    too_long = (
        "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576)."
    )
    long = classify(400, envelope(400, "INVALID_ARGUMENT", too_long), {})
    assert long.outcome is Outcome.CONTEXT_LENGTH
    fault = classify(400, envelope(400, "INVALID_ARGUMENT", "contents: bad"), {})
    assert fault.outcome is Outcome.CLIENT_FAULT and fault.client_error is not None
    assert fault.client_error.message == "contents: bad" and fault.client_error.status == 400
    missing = classify(404, envelope(404, "NOT_FOUND", "models/x is not found"), {})
    assert missing.outcome is Outcome.CLIENT_FAULT
    assert classify(502, b"<html>bad gateway</html>", {}).outcome is Outcome.UNAVAILABLE
    listed = classify(503, b"[" + envelope(503, "UNAVAILABLE", "overloaded") + b"]", {})
    assert "overloaded" in listed.message


def test_check_config_accepts_the_kind_and_refuses_a_keyless_one(tmp_path: Path) -> None:
    path = tmp_path / "ringside.yaml"
    model = f"models:\n  {FLASH}: {{input_per_mtok: 0.3, output_per_mtok: 2.5}}\n"
    path.write_text(
        "storage: {backend: memory}\nproviders:\n"
        "  gemini: {kind: gemini, api_key_env: GEMINI_API_KEY}\n" + model
    )
    result = ringside("check-config", str(path), env={"GEMINI_API_KEY": "x"})
    assert result.returncode == 0, result.stderr
    path.write_text("storage: {backend: memory}\nproviders:\n  gemini: {kind: gemini}\n" + model)
    result = ringside("check-config", str(path))
    assert result.returncode != 0 and "api_key_env" in result.stderr


# -- end to end: a sidecar in front of the fake Gemini API ---------------------------------------
@pytest.fixture(scope="module")
def fake_gemini() -> Iterator[FakeGemini]:
    fake = FakeGemini(KEY)
    fake.server.start()
    yield fake
    fake.server.stop()


@pytest.fixture
def gemini(fake_gemini: FakeGemini) -> Iterator[FakeGemini]:
    fake_gemini.reset()
    yield fake_gemini
    assert fake_gemini.problems() == []  # every request was one the real API takes


@pytest.fixture(scope="module")
def proc(
    fake_gemini: FakeGemini, _openai_server: FakeOpenAI, tmp_path_factory: Any
) -> Iterator[SidecarProcess]:
    config = without_circuit_breakers(
        {
            "storage": {"backend": "memory"},
            "providers": {
                "gemini": {"kind": "gemini", "base_url": fake_gemini.url,
                           "api_key_env": "TEST_GEMINI_KEY", "timeout": {"connect": 2, "read": 5}},
                "openai": {"kind": "openai", "base_url": _openai_server.url,
                           "api_key_env": "TEST_OPENAI_KEY", "timeout": {"connect": 2, "read": 5}},
            },
            "models": {
                FLASH: {"input_per_mtok": 0.30, "output_per_mtok": 2.50, "context": 1048576,
                        "max_output": 65536},
                MINI: {"input_per_mtok": 0.15, "output_per_mtok": 0.60, "context": 128000,
                       "max_output": 16384},
            },
            "slots": {"chat": [FLASH, MINI]},
            "customers": {"thinker": {"budget": {"usd": 1.0, "period": "month"}}},
        }
    )  # fmt: skip
    workdir = tmp_path_factory.mktemp("gemini")
    yield from module_sidecar(workdir, config, {"TEST_GEMINI_KEY": KEY, **ADMIN_ENV})


def chat(proc: SidecarProcess, **body: Any) -> Any:
    return post_chat(proc, {"model": FLASH, "messages": HELLO, **body})


def test_plain_chat_through_the_openai_sdk(proc: SidecarProcess, gemini: FakeGemini) -> None:
    gemini.script(Reply(text="Bonjour!"))
    answer = sdk(proc).chat.completions.with_raw_response.create(
        model=FLASH,
        messages=[{"role": "system", "content": "Answer in French."}, *HELLO],  # type: ignore[list-item]
        temperature=0.2,
    )
    completion = ChatCompletion.model_validate(json.loads(answer.content))
    assert completion.choices[0].message.content == "Bonjour!"
    assert completion.model == "gemini-2.5-flash"
    assert answer.headers["X-Ringside-Model-Used"] == FLASH
    sent = gemini.last
    assert sent.model == "gemini-2.5-flash" and sent.method == "generateContent"
    assert sent.body["systemInstruction"] == {"parts": [{"text": "Answer in French."}]}
    assert sent.body["generationConfig"]["temperature"] == 0.2
    assert sent.headers["x-goog-api-key"] == KEY and "Authorization" not in sent.headers


def test_a_stream_validates_chunk_by_chunk(proc: SidecarProcess, gemini: FakeGemini) -> None:
    gemini.script(Reply(text="one two three four", chunks=4, prompt_tokens=20, output_tokens=6))
    answer = chat(proc, stream=True, stream_options={"include_usage": True})
    assert answer.status == 200
    payloads = sse_events(answer.body)
    assert payloads[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(p) for p in payloads[:-1]]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (20, 6)
    assert gemini.last.method == "streamGenerateContent" and gemini.last.query == {"alt": "sse"}

    gemini.script(Reply(text="plain"))
    with sdk(proc).chat.completions.create(model=FLASH, messages=HELLO, stream=True) as stream:  # type: ignore[arg-type]
        seen = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in seen if c.choices) == "plain"
    assert all(c.usage is None for c in seen)


def test_a_tool_call_round_trip(proc: SidecarProcess, gemini: FakeGemini) -> None:
    signature = b"gemini-thought-signature"
    gemini.script(
        Reply(text="", calls=[Call("get_weather", {"city": "Paris"}, signature=signature)])
    )
    client = sdk(proc)
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model=FLASH, messages=messages, tools=[WEATHER])  # type: ignore[list-item]
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (tool_call,) = choice.message.tool_calls  # type: ignore[misc]
    assert json.loads(tool_call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    declared = gemini.last.body["tools"][0]["functionDeclarations"][0]
    assert declared["parametersJsonSchema"]["required"] == ["city"]

    gemini.script(Reply(text="It is sunny in Paris."))
    messages += [
        choice.message.model_dump(exclude_none=True),  # as SDK users append it: extras kept
        {"role": "tool", "tool_call_id": tool_call.id, "content": "sunny, 24 C"},
    ]
    second = client.chat.completions.create(model=FLASH, messages=messages, tools=[WEATHER])  # type: ignore[list-item]
    assert second.choices[0].message.content == "It is sunny in Paris."
    model, result = gemini.last.body["contents"][1:]
    assert model == {"role": "model", "parts": [
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": tool_call.id},
         "thoughtSignature": base64.b64encode(signature).decode()}]}  # fmt: skip
    response = {"output": "sunny, 24 C"}
    assert result == {"role": "user", "parts": [{"functionResponse": {
        "id": tool_call.id, "name": "get_weather", "response": response}}]}  # fmt: skip


def test_a_streamed_tool_call(proc: SidecarProcess, gemini: FakeGemini) -> None:
    gemini.script(
        Reply(text="Let me check.",
              calls=[Call("get_weather", {"city": "Paris"}, "fc-1"),
                     Call("get_weather", {"city": "Rome"})])
    )  # fmt: skip
    answer = chat(proc, stream=True, tools=[WEATHER], tool_choice="required")
    chunks = [ChatCompletionChunk.model_validate_json(p) for p in sse_events(answer.body)[:-1]]
    calls = {
        delta.index: (delta.id, json.loads(delta.function.arguments or ""))  # type: ignore[union-attr]
        for chunk in chunks
        for delta in chunk.choices[0].delta.tool_calls or []
    }
    assert calls[0] == ("fc-1", {"city": "Paris"}) and calls[1][1] == {"city": "Rome"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert gemini.last.body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}


def test_images_reach_gemini_as_inline_and_file_data(
    proc: SidecarProcess, gemini: FakeGemini
) -> None:
    content = [
        {"type": "text", "text": "Compare these."},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.webp"}},
    ]
    answer = sdk(proc).chat.completions.create(
        model=FLASH,
        messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
    )
    assert answer.choices[0].message.content
    parts = gemini.last.body["contents"][0]["parts"]
    assert parts[1] == {"inlineData": {"mimeType": "image/png", "data": PIXEL}}
    assert parts[2] == {"fileData": {"fileUri": "https://example.com/cat.webp",
                                     "mimeType": "image/webp"}}  # fmt: skip


def test_several_choices_through_candidate_count(proc: SidecarProcess, gemini: FakeGemini) -> None:
    gemini.script(Reply(text="hi"))
    completion = sdk(proc).chat.completions.create(model=FLASH, messages=HELLO, n=2)  # type: ignore[arg-type]
    assert [c.message.content for c in completion.choices] == ["hi", "hi (1)"]
    assert gemini.last.body["generationConfig"]["candidateCount"] == 2


@pytest.mark.parametrize(
    "reply",
    [
        Reply(status=429, error_status="RESOURCE_EXHAUSTED", retry_delay="1s"),
        Reply(status=503, error_status="UNAVAILABLE", error_message="The model is overloaded."),
        Reply(status=500, error_status="INTERNAL"),
        Reply(status=403, error_status="PERMISSION_DENIED"),
        Reply(status=400, error_status="INVALID_ARGUMENT", error_reason="API_KEY_INVALID",
              error_message="API key not valid. Please pass a valid API key."),
        Reply(status=400, error_status="INVALID_ARGUMENT",
              error_message="The input token count (1200000) exceeds the maximum number of "
                            "tokens allowed (1048576)."),
    ],
    ids=["429", "503", "500", "403", "key", "context"],
)  # fmt: skip
def test_failures_escalate_to_the_next_provider_of_a_cascade(
    proc: SidecarProcess, gemini: FakeGemini, fake_openai: FakeOpenAI, reply: Reply
) -> None:
    gemini.script(reply)
    answer = post_chat(proc, {"model": [FLASH, MINI], "messages": HELLO})
    assert answer.status == 200, answer.body
    ChatCompletion.model_validate(answer.json())
    assert answer.headers["X-Ringside-Models-Tried"] == f"{FLASH},{MINI}"
    assert answer.headers["X-Ringside-Fallback-Triggered"] == "true"
    assert fake_openai.models_called() == ["gpt-4o-mini"]


def test_alone_the_failures_are_503_with_retry_after_and_400_for_context(
    proc: SidecarProcess, gemini: FakeGemini
) -> None:
    gemini.script(Reply(status=429, error_status="RESOURCE_EXHAUSTED", retry_delay="2s"))
    limited = chat(proc)
    assert limited.status == 503 and limited.error["code"] == "upstream_unavailable"
    assert limited.headers["Retry-After"] == "2"
    gemini.script(Reply(status=400, error_status="INVALID_ARGUMENT",
                        error_message="The input token count (2000000) exceeds the maximum "
                                      "number of tokens allowed (1048576)."))  # fmt: skip
    long = chat(proc)
    assert long.status == 400 and long.error["code"] == "context_length_exceeded"


def test_a_request_gemini_refuses_is_the_clients_fault_and_does_not_escalate(
    proc: SidecarProcess, gemini: FakeGemini, fake_openai: FakeOpenAI
) -> None:
    message = "* GenerateContentRequest.contents: contents is not specified"
    gemini.script(Reply(status=400, error_status="INVALID_ARGUMENT", error_message=message))
    answer = post_chat(proc, {"model": [FLASH, MINI], "messages": HELLO})
    assert answer.status == 400 and "contents is not specified" in answer.error["message"]
    assert fake_openai.models_called() == []


def test_an_error_before_the_first_chunk_escalates_a_streamed_slot(
    proc: SidecarProcess, gemini: FakeGemini, fake_openai: FakeOpenAI
) -> None:
    gemini.script(Reply(error_after_chunks=0))
    answer = post_chat(proc, {"model": "slot:chat", "messages": HELLO, "stream": True})
    assert answer.status == 200
    assert answer.headers["X-Ringside-Model-Used"] == MINI
    assert fake_openai.models_called() == ["gpt-4o-mini"]


def test_an_error_event_mid_stream_ends_the_stream_with_an_sse_error(
    proc: SidecarProcess, gemini: FakeGemini
) -> None:
    gemini.script(Reply(text="one two three", chunks=3, error_after_chunks=2))
    payloads = sse_events(chat(proc, stream=True).body)
    last = json.loads(payloads[-1])
    assert "error" in last and "internal error" in last["error"]["message"]
    chunks = [ChatCompletionChunk.model_validate_json(p) for p in payloads[:-1]]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "one two th"  # 2 of 3


def test_structured_output_natively_with_one_reprompt(
    proc: SidecarProcess, gemini: FakeGemini
) -> None:
    gemini.script(Reply(text='{"name": "Ada"}'), Reply(text='{"name": "Ada", "age": 36}'))
    answer = chat(proc, response_format=PERSON)
    assert answer.status == 200, answer.body
    completion = ChatCompletion.model_validate(answer.json())
    assert json.loads(completion.choices[0].message.content or "") == {"name": "Ada", "age": 36}
    assert answer.headers["X-Ringside-Schema-Reprompts"] == "1"
    first, second = gemini.received
    assert first.body["generationConfig"] == {
        "responseMimeType": "application/json", "responseJsonSchema": PERSON_SCHEMA,
    }  # fmt: skip
    assert second.body["contents"][1] == {"role": "model", "parts": [{"text": '{"name": "Ada"}'}]}
    assert "age" in second.body["contents"][2]["parts"][0]["text"]


def test_json_object_uses_gemini_json_mode(proc: SidecarProcess, gemini: FakeGemini) -> None:
    gemini.script(Reply(text='{"ok": true}'))
    answer = chat(proc, response_format={"type": "json_object"})
    assert answer.status == 200 and json.loads(answer.json()["choices"][0]["message"]["content"])
    assert gemini.last.body["generationConfig"] == {"responseMimeType": "application/json"}


def test_usage_and_cost_price_thinking_as_output(proc: SidecarProcess, gemini: FakeGemini) -> None:
    gemini.script(
        Reply(prompt_tokens=1000, output_tokens=50, thoughts_tokens=150, cached_tokens=400)
    )
    answer = post_chat(proc, {"model": FLASH, "messages": HELLO}, {"FC-Customer": "thinker"})
    usage = answer.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (1000, 200)
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 150}
    assert usage["prompt_tokens_details"] == {"cached_tokens": 400}
    # 1000 x $0.30/M + 200 x $2.50/M
    assert nano(float(answer.headers["X-Ringside-Cost-USD"])) == 800_000
    report = settled_usage(proc, "thinker", 1)
    assert report["tokens"] == {"input": 1000, "output": 200, "total": 1200}
    assert nano(report["cost_usd"]) == 800_000
