"""The `bedrock` kind (Amazon Bedrock Converse / ConverseStream): the translation in process, then
through a real sidecar and the official `openai` SDK against a fake Bedrock runtime that checks
every request as AWS does (tests/upstreams/bedrock_fake.py: the SigV4 signature recomputed with
botocore, bodies validated against botocore's `bedrock-runtime` service model, streams as
event-stream frames with their CRCs). Credentials come from the environment (and, in one test,
from a container-credentials endpoint, as EKS pod identity serves them); no test leaves the
loopback: shared AWS files and the instance metadata lookup are switched off."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from sidecar.errors import Outcome, UpstreamError
from sidecar.providers import bedrock
from sidecar.providers.base import UpstreamCall
from sidecar.providers.bedrock import BedrockAdapter, failure, settings_problems
from sidecar.providers.bedrock_auth import REREAD_SECONDS, AwsCredentials
from sidecar.providers.bedrock_eventstream import EventStreamParser
from sidecar.providers.bedrock_request import converse_body
from sidecar.settings.model import ProviderSettings
from tests.procs import SidecarProcess
from tests.support import (
    HELLO,
    metric,
    metric_samples,
    module_sidecar,
    post_chat,
    ringside,
    sdk,
    sse_events,
    without_circuit_breakers,
)
from tests.upstreams.bedrock_fake import (
    BedrockReply,
    FakeBedrock,
    ToolUse,
    converse_problems,
    frame,
    throttled,
    too_long,
)
from tests.upstreams.server import ThreadedServer

ACCESS_KEY = "AKIAFAKEBEDROCK00001"
SECRET_KEY = "fake-secret-access-key-for-the-bedrock-tests"
API_KEY = "ABSKQmVkcm9ja0FQSUtleS1mYWtl"  # a Bedrock API key
MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"
NOVA = "amazon.nova-lite-v1:0"
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n fake image bytes").decode()
WEATHER_TOOL: Any = {
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
PERSON: Any = {
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
# the AWS chain of the sidecars started here: these keys, and nothing found elsewhere
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def settings(**fields: Any) -> ProviderSettings:
    return ProviderSettings(
        name="bed",
        kind="bedrock",
        base_url=None,
        api_key_env=None,
        **{"region": "eu-west-1", **fields},
    )


def call(body: dict[str, Any], stream: bool = False, model: str = MODEL) -> UpstreamCall:
    return UpstreamCall(settings(), model, {"model": f"fc:bed/{model}", **body}, stream)


# -- the request, in process ----------------------------------------------------------------------


def test_url_is_the_regional_runtime_with_the_model_id_encoded() -> None:
    adapter = BedrockAdapter(settings())
    request = adapter.build_request(call({"messages": HELLO}))
    assert request.url == (
        "https://bedrock-runtime.eu-west-1.amazonaws.com/model/"
        "anthropic.claude-3-5-haiku-20241022-v1%3A0/converse"
    )
    streamed = adapter.build_request(call({"messages": HELLO}, stream=True))
    assert streamed.url.endswith("/converse-stream")
    arn = "arn:aws:bedrock:eu-west-1:123456789012:inference-profile/eu.x"
    assert "/model/arn%3Aaws%3Abedrock%3Aeu-west-1%3A123456789012%3Ainference-profile%2Feu.x/" in (
        adapter.build_request(call({"messages": HELLO}, model=arn)).url
    )
    assert "Authorization" not in request.headers  # signed later, per call


def test_a_whole_conversation_translates_into_a_body_botocore_validates() -> None:
    body = converse_body(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use metric."}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "Weather where this is?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                ]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
                    {"id": "call#2", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Bergen"}'}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call#2", "content": "rain"},
                {"role": "user", "content": "Thanks!"},
            ],
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "temperature": 1.7,
            "top_p": 0.9,
            "max_tokens": 300,
            "max_completion_tokens": 200,
            "stop": ["END"],
            "seed": 7,
            "user": "u1",
            "parallel_tool_calls": False,
        },
        "bed",
    )  # fmt: skip
    assert converse_problems(body, MODEL) is None
    assert body["system"] == [{"text": "Be brief."}, {"text": "Use metric."}]
    assert [turn["role"] for turn in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][0]["content"][1] == {
        "image": {"format": "png", "source": {"bytes": PNG}}
    }
    uses = [block["toolUse"] for block in body["messages"][1]["content"]]
    assert [(u["toolUseId"], u["input"]) for u in uses] == [
        ("call_1", {"city": "Oslo"}),
        ("call_2", {"city": "Bergen"}),
    ]
    results = body["messages"][2]["content"]
    assert [block["toolResult"]["toolUseId"] for block in results[:2]] == ["call_1", "call_2"]
    assert results[2] == {"text": "Thanks!"}  # tool results first, then the user's text
    assert body["inferenceConfig"] == {
        "maxTokens": 200, "temperature": 1, "topP": 0.9, "stopSequences": ["END"],
    }  # fmt: skip
    assert body["toolConfig"]["toolChoice"] == {"tool": {"name": "get_weather"}}
    assert (
        body["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"]["json"]
        == (WEATHER_TOOL["function"]["parameters"])
    )


@pytest.mark.parametrize(
    ("choice", "expected"),
    [("auto", {"auto": {}}), ("required", {"any": {}}), (None, {"auto": {}})],
)
def test_tool_choice_maps_onto_converse(choice: Any, expected: dict[str, Any]) -> None:
    body = converse_body({"messages": HELLO, "tools": [WEATHER_TOOL], "tool_choice": choice}, "b")
    assert body["toolConfig"]["toolChoice"] == expected


def test_tool_choice_none_leaves_the_tools_out() -> None:
    body = converse_body({"messages": HELLO, "tools": [WEATHER_TOOL], "tool_choice": "none"}, "b")
    assert "toolConfig" not in body


def test_tool_choice_none_keeps_the_tools_a_conversation_with_tool_calls_needs() -> None:
    messages = [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]  # fmt: skip
    body = converse_body(
        {"messages": messages, "tools": [WEATHER_TOOL], "tool_choice": "none"}, "b"
    )
    assert converse_problems(body, MODEL) is None
    assert body["toolConfig"]["toolChoice"] == {"auto": {}}  # Converse refuses tool blocks without


def test_json_schema_with_the_clients_tools_lets_the_model_call_either() -> None:
    body = converse_body(
        {"messages": HELLO, "tools": [WEATHER_TOOL], "response_format": PERSON}, "b"
    )
    names = [tool["toolSpec"]["name"] for tool in body["toolConfig"]["tools"]]
    assert names == ["get_weather", "person"]
    assert body["toolConfig"]["toolChoice"] == {"any": {}}


def test_json_schema_is_a_forced_tool_with_the_schema_as_input() -> None:
    body = converse_body({"messages": HELLO, "response_format": PERSON}, "b")
    assert converse_problems(body, MODEL) is None
    (tool,) = body["toolConfig"]["tools"]
    assert tool["toolSpec"]["name"] == "person"
    assert tool["toolSpec"]["inputSchema"]["json"] == PERSON["json_schema"]["schema"]
    assert body["toolConfig"]["toolChoice"] == {"tool": {"name": "person"}}


def test_an_image_by_url_is_refused_naming_the_provider() -> None:
    message = {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    ]}  # fmt: skip
    with pytest.raises(UpstreamError) as caught:
        converse_body({"messages": [message]}, "bed")
    error = caught.value.client_error
    assert error is not None and error.status == 400
    assert "'bed'" in error.message and "data URL" in error.message
    assert error.param == "messages[0].content[0].image_url"


def test_n_above_one_is_refused_naming_the_provider() -> None:
    with pytest.raises(UpstreamError) as caught:
        converse_body({"messages": HELLO, "n": 2}, "bed")
    assert caught.value.client_error is not None
    assert caught.value.client_error.param == "n" and "'bed'" in caught.value.message


# -- errors, in process ---------------------------------------------------------------------------


def aws_error(error_type: str, message: str, status: int) -> UpstreamError:
    adapter = BedrockAdapter(settings())
    headers = {"x-amzn-ErrorType": f"{error_type}:http://internal.amazon.com/coral/"}
    return adapter.classify_error(status, json.dumps({"message": message}).encode(), headers)


@pytest.mark.parametrize(
    ("error_type", "status"),
    [
        ("ThrottlingException", 429),
        ("ModelNotReadyException", 429),
        ("ServiceUnavailableException", 503),
        ("InternalServerException", 500),
        ("ModelTimeoutException", 408),
        ("ModelErrorException", 424),
        ("AccessDeniedException", 403),
        ("UnrecognizedClientException", 403),
        ("InvalidSignatureException", 403),
    ],
)
def test_service_and_credential_failures_escalate(error_type: str, status: int) -> None:
    error = aws_error(error_type, "something", status)
    assert error.outcome is Outcome.UNAVAILABLE
    assert error.status == status


def test_a_too_long_input_is_a_context_length_failure() -> None:
    for text in ("Input is too long for requested model.", "too many input tokens: 9000 > 8192"):
        assert aws_error("ValidationException", text, 400).outcome is Outcome.CONTEXT_LENGTH


def test_another_validation_error_is_the_requests_fault_with_aws_words() -> None:
    error = aws_error("ValidationException", "The model does not support tool use.", 400)
    assert error.outcome is Outcome.CLIENT_FAULT
    assert error.client_error is not None and error.client_error.status == 400
    assert error.client_error.message == "ValidationException: The model does not support tool use."


def test_the_error_type_is_read_from_the_body_when_the_header_is_missing() -> None:
    body = b'{"__type": "com.amazon.coral.service#ThrottlingException", "message": "slow down"}'
    error = BedrockAdapter(settings()).classify_error(400, body, {})
    assert error.outcome is Outcome.UNAVAILABLE and "slow down" in error.message
    assert failure(429, None, "x").outcome is Outcome.UNAVAILABLE


# -- the stream, in process -----------------------------------------------------------------------


def decode(frames: list[bytes], body: dict[str, Any] | None = None) -> list[bytes]:
    adapter = BedrockAdapter(settings())
    decoder = adapter.stream_decoder(call(body or {"messages": HELLO}, stream=True))
    parser = adapter.stream_parser()
    data = b"".join(frames)
    out: list[bytes] = []
    for start in range(0, len(data), 7):  # frames cut anywhere
        for event, payload in parser.feed(data[start : start + 7]):
            out += decoder.feed(event, payload)
    assert decoder.finished
    return out


def events(*items: tuple[str, dict[str, Any]]) -> list[bytes]:
    return [frame(name, payload) for name, payload in items]


def test_stream_events_become_openai_chunks_with_usage_when_asked() -> None:
    frames = events(
        ("messageStart", {"role": "assistant"}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hel"}}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "lo"}}),
        ("contentBlockStop", {"contentBlockIndex": 0}),
        ("contentBlockStart", {"contentBlockIndex": 1,
                               "start": {"toolUse": {"toolUseId": "t1", "name": "get_weather"}}}),
        ("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": '{"ci'}}}),
        ("contentBlockDelta", {"contentBlockIndex": 1,
                               "delta": {"toolUse": {"input": 'ty":"X"}'}}}),
        ("contentBlockStop", {"contentBlockIndex": 1}),
        ("messageStop", {"stopReason": "tool_use"}),
        ("metadata", {"usage": {"inputTokens": 5, "outputTokens": 3, "totalTokens": 10,
                                "cacheReadInputTokens": 2}, "metrics": {"latencyMs": 1}}),
    )  # fmt: skip
    body = {"messages": HELLO, "stream_options": {"include_usage": True}}
    chunks = [ChatCompletionChunk.model_validate_json(c) for c in decode(frames, body)]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello"
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert calls[0].id == "t1" and calls[0].function is not None
    assert "".join(tc.function.arguments or "" for tc in calls if tc.function) == '{"city":"X"}'
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 7
    assert chunks[-1].usage.prompt_tokens_details is not None
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 2


def test_an_exception_event_mid_stream_fails_the_attempt_as_its_http_answer_would() -> None:
    adapter = BedrockAdapter(settings())
    decoder = adapter.stream_decoder(call({"messages": HELLO}, stream=True))
    parser = adapter.stream_parser()
    exception = frame("throttlingException", {"message": "slow down"}, message_type="exception")
    ((event, payload),) = parser.feed(exception)
    with pytest.raises(UpstreamError) as caught:
        decoder.feed(event, payload)
    assert caught.value.outcome is Outcome.UNAVAILABLE and caught.value.status == 429
    assert "mid-stream" in caught.value.message and "slow down" in caught.value.message
    invalid = frame("validationException", {"message": "bad input"}, message_type="exception")
    ((event, payload),) = parser.feed(invalid)
    with pytest.raises(UpstreamError) as caught:
        decoder.feed(event, payload)
    assert caught.value.outcome is Outcome.CLIENT_FAULT


def test_an_error_message_of_the_framing_fails_the_attempt() -> None:
    headers = b"".join(
        bytes([len(name)]) + name + b"\x07" + len(value).to_bytes(2, "big") + value
        for name, value in (
            (b":message-type", b"error"),
            (b":error-code", b"InternalFailure"),
            (b":error-message", b"the stream broke"),
        )
    )
    total = 12 + len(headers) + 4
    prelude = total.to_bytes(4, "big") + len(headers).to_bytes(4, "big")
    message = prelude + zlib.crc32(prelude).to_bytes(4, "big") + headers
    ((event, payload),) = EventStreamParser().feed(message + zlib.crc32(message).to_bytes(4, "big"))
    assert event == "error:InternalFailure"
    adapter = BedrockAdapter(settings())
    decoder = adapter.stream_decoder(call({"messages": HELLO}, stream=True))
    with pytest.raises(UpstreamError) as caught:
        decoder.feed(event, payload)
    assert (
        caught.value.outcome is Outcome.UNAVAILABLE and "the stream broke" in caught.value.message
    )


def test_a_frame_with_a_wrong_crc_is_an_unparseable_body() -> None:
    data = bytearray(frame("messageStart", {"role": "assistant"}))
    data[-1] ^= 0xFF
    with pytest.raises(UpstreamError) as caught:
        EventStreamParser().feed(bytes(data))
    assert caught.value.reason == "bad_body" and "ChecksumMismatch" in caught.value.message


# -- settings and credentials, in process ---------------------------------------------------------


def test_a_provider_without_a_region_is_refused_unless_the_environment_has_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    problems = settings_problems(settings(region=None))
    assert any("needs a region" in message for _, message in problems)
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert settings_problems(settings(region=None)) == []
    assert BedrockAdapter(settings(region=None)).region == "ap-south-1"


def test_without_botocore_the_config_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "botocore.auth", None)
    problems = settings_problems(settings())
    assert any(bedrock.INSTALL_HINT in message for _, message in problems)


def test_check_config_takes_a_bedrock_provider_and_refuses_one_without_a_region(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ringside.yaml"
    path.write_text(
        "providers:\n  bedrock:\n    kind: bedrock\n    region: eu-central-1\n"
        f"models:\n  fc:bedrock/{MODEL}: {{input_per_mtok: 0.8, output_per_mtok: 4}}\n"
    )
    assert ringside("check-config", str(path)).returncode == 0
    path.write_text("providers:\n  bedrock: {kind: bedrock}\n")
    result = ringside("check-config", str(path))
    assert result.returncode != 0 and "providers.bedrock: bedrock needs a region" in result.stderr
    assert ringside("check-config", str(path), env={"AWS_REGION": "us-east-2"}).returncode == 0


class Chain:
    """A botocore credentials source whose reads are counted (and can fail)."""

    def __init__(self) -> None:
        self.reads = 0
        self.fail = False

    def get_frozen_credentials(self) -> Any:
        from botocore.credentials import ReadOnlyCredentials

        self.reads += 1
        if self.fail:
            raise RuntimeError("sts is down")
        return ReadOnlyCredentials(f"AKIA{self.reads}", "secret", None)


async def test_credentials_are_read_off_the_loop_and_again_in_the_background() -> None:
    chain, now = Chain(), [0.0]
    credentials = AwsCredentials("bed", resolve=lambda: chain, clock=lambda: now[0])
    first = await credentials.current()
    assert first.access_key == "AKIA1" and chain.reads == 1
    assert await credentials.current() is first  # held: no read
    now[0] += REREAD_SECONDS
    assert await credentials.current() is first  # served at once, read again behind it
    await asyncio.sleep(0.05)
    assert chain.reads == 2 and (await credentials.current()).access_key == "AKIA2"
    now[0] += REREAD_SECONDS
    chain.fail = True
    assert (await credentials.current()).access_key == "AKIA2"  # a failed re-read keeps them
    await asyncio.sleep(0.05)
    assert (await credentials.current()).access_key == "AKIA2"


async def test_no_credentials_at_all_is_an_unavailable_provider() -> None:
    credentials = AwsCredentials("bed", resolve=lambda: None)
    with pytest.raises(UpstreamError) as caught:
        await credentials.current()
    assert caught.value.outcome is Outcome.UNAVAILABLE and "'bed'" in caught.value.message


# -- through a sidecar ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bedrock_server() -> Iterator[FakeBedrock]:
    fake = FakeBedrock(ACCESS_KEY, SECRET_KEY, region="us-east-1", api_keys=frozenset({API_KEY}))
    fake.server.start()
    yield fake
    fake.server.stop()


@pytest.fixture
def fake(bedrock_server: FakeBedrock) -> Iterator[FakeBedrock]:
    bedrock_server.reset()
    yield bedrock_server
    assert bedrock_server.problems == []


def provider(url: str, region: str = "us-east-1") -> dict[str, Any]:
    return {"kind": "bedrock", "base_url": url, "region": region,
            "timeout": {"connect": 2, "read": 5}}  # fmt: skip


@pytest.fixture(scope="module")
def sidecar(
    bedrock_server: FakeBedrock, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    url = bedrock_server.url
    config = {
        "storage": {"backend": "memory"},
        "providers": {
            "bed": provider(url),
            "bed2": provider(url),
            "bedwest": provider(url, region="us-west-2"),  # signed for a region the fake is not
            "bedkey": {**provider(url), "api_key_env": "AWS_BEARER_TOKEN_BEDROCK"},
            "bedretry": {**provider(url), "retries": 1, "retry_backoff": 0.01},
        },
        "models": {
            f"fc:bed/{MODEL}": {"input_per_mtok": 1.0, "output_per_mtok": 5.0, "context": 200000},
            f"fc:bed2/{NOVA}": {"input_per_mtok": 0.06, "output_per_mtok": 0.24},
        },
        "slots": {
            "chat": [f"fc:bed/{MODEL}", f"fc:bed2/{NOVA}"],
            "signed_wrong": [f"fc:bedwest/{MODEL}", f"fc:bed2/{NOVA}"],
        },
    }
    workdir = tmp_path_factory.mktemp("bedrock")
    env = {**AWS_ENV, "AWS_BEARER_TOKEN_BEDROCK": API_KEY}
    yield from module_sidecar(workdir, without_circuit_breakers(config), env)


def completion(proc: SidecarProcess, body: dict[str, Any]) -> tuple[ChatCompletion, Any]:
    answer = post_chat(proc, body)
    assert answer.status == 200, answer.body
    return ChatCompletion.model_validate(answer.json()), answer.headers


def chunks(proc: SidecarProcess, body: dict[str, Any]) -> list[ChatCompletionChunk]:
    answer = post_chat(proc, {**body, "stream": True})
    assert answer.status == 200, answer.body
    data = sse_events(answer.body)
    assert data[-1] == "[DONE]"
    return [ChatCompletionChunk.model_validate_json(event) for event in data[:-1]]


def test_plain_answer_through_the_sdk(sidecar: SidecarProcess, fake: FakeBedrock) -> None:
    answer = sdk(sidecar).chat.completions.create(
        model=f"fc:bed/{MODEL}",
        messages=[{"role": "system", "content": "Be nice."}, *HELLO],
        max_tokens=50,
        temperature=0.2,
    )
    assert answer.choices[0].message.content == "Hello from the fake Bedrock model."
    assert answer.choices[0].finish_reason == "stop"
    assert answer.model == MODEL
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (11, 7)
    (seen,) = fake.requests
    assert (seen["model"], seen["op"]) == (MODEL, "converse")
    assert seen["body"]["system"] == [{"text": "Be nice."}]
    assert seen["body"]["inferenceConfig"] == {"maxTokens": 50, "temperature": 0.2}
    assert seen["headers"]["Authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/")


def test_a_bedrock_api_key_is_sent_as_a_bearer_instead_of_a_signature(
    sidecar: SidecarProcess, fake: FakeBedrock
) -> None:
    answer, _ = completion(sidecar, {"model": f"fc:bedkey/{MODEL}", "messages": HELLO})
    assert answer.choices[0].message.content == "Hello from the fake Bedrock model."
    (seen,) = fake.requests
    assert seen["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert "X-Amz-Date" not in seen["headers"]


def test_a_cascade_that_streams_escalates_from_throttling_before_the_first_chunk(
    sidecar: SidecarProcess, fake: FakeBedrock
) -> None:
    fake.script(throttled())
    answer = post_chat(sidecar, {"model": "slot:chat", "messages": HELLO, "stream": True})
    assert answer.status == 200, answer.body
    assert answer.headers["X-Ringside-Model-Used"] == f"fc:bed2/{NOVA}"
    data = sse_events(answer.body)
    assert data[-1] == "[DONE]"
    text = "".join(
        ChatCompletionChunk.model_validate_json(event).choices[0].delta.content or ""
        for event in data[:-1]
    )
    assert text == "Hello from the fake Bedrock model."


def test_stream_through_the_sdk_with_usage(sidecar: SidecarProcess, fake: FakeBedrock) -> None:
    stream = sdk(sidecar).chat.completions.create(
        model=f"fc:bed/{MODEL}", messages=HELLO, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    got = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in got if c.choices)
    assert text == "Hello from the fake Bedrock model."
    assert [c.choices[0].finish_reason for c in got if c.choices][-1] == "stop"
    assert got[-1].usage is not None and got[-1].usage.total_tokens == 18
    assert fake.requests[0]["op"] == "converse-stream"


def test_a_stream_without_include_usage_has_no_usage_chunk(
    sidecar: SidecarProcess, fake: FakeBedrock
) -> None:
    got = chunks(sidecar, {"model": f"fc:bed/{MODEL}", "messages": HELLO})
    assert all(c.usage is None for c in got) and all(c.choices for c in got)


def test_tool_round_trip(sidecar: SidecarProcess, fake: FakeBedrock) -> None:
    fake.script(
        BedrockReply(text="", tool_uses=[ToolUse("get_weather", {"city": "Oslo"}, "tooluse_1")],
                     stop_reason="tool_use"),
        BedrockReply(text="It is sunny in Oslo."),
    )  # fmt: skip
    messages: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}]
    first, _ = completion(
        sidecar, {"model": f"fc:bed/{MODEL}", "messages": messages, "tools": [WEATHER_TOOL]}
    )
    assert first.choices[0].finish_reason == "tool_calls"
    (tool_call,) = first.choices[0].message.tool_calls or []
    assert tool_call.id == "tooluse_1"
    assert json.loads(tool_call.function.arguments) == {"city": "Oslo"}  # type: ignore[union-attr]
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tool_call.id, "content": "sunny, 21 C"},
    ]
    second, _ = completion(
        sidecar, {"model": f"fc:bed/{MODEL}", "messages": messages, "tools": [WEATHER_TOOL]}
    )
    assert second.choices[0].message.content == "It is sunny in Oslo."
    turns = fake.requests[1]["body"]["messages"]
    assert turns[1]["content"] == [
        {"toolUse": {"toolUseId": "tooluse_1", "name": "get_weather", "input": {"city": "Oslo"}}}
    ]
    assert turns[2] == {"role": "user", "content": [
        {"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": "sunny, 21 C"}]}}
    ]}  # fmt: skip
    assert fake.requests[0]["body"]["toolConfig"]["toolChoice"] == {"auto": {}}


def test_streamed_tool_call(sidecar: SidecarProcess, fake: FakeBedrock) -> None:
    fake.script(
        BedrockReply(text="Let me look.", stop_reason="tool_use",
                     tool_uses=[ToolUse("get_weather", {"city": "Oslo"}, "tooluse_9")])
    )  # fmt: skip
    got = chunks(
        sidecar, {"model": f"fc:bed/{MODEL}", "messages": HELLO, "tools": [WEATHER_TOOL],
                  "tool_choice": "required"},
    )  # fmt: skip
    calls = [tc for c in got for tc in c.choices[0].delta.tool_calls or ()]
    assert calls[0].id == "tooluse_9" and calls[0].index == 0
    arguments = "".join(tc.function.arguments or "" for tc in calls if tc.function)
    assert json.loads(arguments) == {"city": "Oslo"}
    assert got[-1].choices[0].finish_reason == "tool_calls"
    assert fake.requests[0]["body"]["toolConfig"]["toolChoice"] == {"any": {}}


def test_vision_with_a_data_url(sidecar: SidecarProcess, fake: FakeBedrock) -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{PNG}"}},
    ]
    completion(
        sidecar, {"model": f"fc:bed/{MODEL}", "messages": [{"role": "user", "content": content}]}
    )
    image = fake.requests[0]["body"]["messages"][0]["content"][1]["image"]
    assert image["format"] == "jpeg"
    assert base64.b64decode(image["source"]["bytes"]) == base64.b64decode(PNG)


def test_an_image_url_is_a_400_naming_the_provider(
    sidecar: SidecarProcess, fake: FakeBedrock
) -> None:
    content = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    answer = post_chat(
        sidecar, {"model": f"fc:bed/{MODEL}", "messages": [{"role": "user", "content": content}]}
    )
    assert answer.status == 400
    assert "'bed'" in answer.error["message"] and "Bedrock" in answer.error["message"]
    assert fake.requests == []


def test_throttling_escalates_to_the_next_candidate(
    sidecar: SidecarProcess, fake: FakeBedrock
) -> None:
    fake.script(throttled())
    answer, headers = completion(sidecar, {"model": "slot:chat", "messages": HELLO})
    assert answer.model == NOVA
    assert headers["X-Ringside-Model-Used"] == f"fc:bed2/{NOVA}"
    assert headers["X-Ringside-Fallback-Triggered"] == "true"


def test_throttling_is_retried_on_the_same_model_when_the_provider_retries(
    sidecar: SidecarProcess, fake: FakeBedrock
) -> None:
    fake.script(throttled())
    _, headers = completion(sidecar, {"model": f"fc:bedretry/{MODEL}", "messages": HELLO})
    assert headers["X-Ringside-Model-Used"] == f"fc:bedretry/{MODEL}"
    assert len(fake.requests) == 2  # signed afresh each time: both pass the signature check


def test_a_too_long_prompt_escalates_and_alone_is_context_length_exceeded(
    sidecar: SidecarProcess, fake: FakeBedrock
) -> None:
    fake.script(too_long())
    _, headers = completion(sidecar, {"model": "slot:chat", "messages": HELLO})
    assert headers["X-Ringside-Model-Used"] == f"fc:bed2/{NOVA}"
    fake.script(too_long())
    answer = post_chat(sidecar, {"model": f"fc:bed/{MODEL}", "messages": HELLO})
    assert answer.status == 400 and answer.error["code"] == "context_length_exceeded"


def test_a_model_not_ready_then_unavailable_everywhere_is_a_503(
    sidecar: SidecarProcess, fake: FakeBedrock
) -> None:
    fake.script(
        BedrockReply(status=429, error_type="ModelNotReadyException", message="warming up"),
        BedrockReply(status=503, error_type="ServiceUnavailableException", message="down"),
    )
    answer = post_chat(sidecar, {"model": "slot:chat", "messages": HELLO})
    assert answer.status == 503 and answer.error["code"] == "upstream_unavailable"


def test_a_validation_error_is_returned_at_once_without_escalating(
    sidecar: SidecarProcess, fake: FakeBedrock
) -> None:
    fake.script(
        BedrockReply(status=400, error_type="ValidationException",
                     message="This model doesn't support the toolConfig.toolChoice.any field.")
    )  # fmt: skip
    answer = post_chat(sidecar, {"model": "slot:chat", "messages": HELLO})
    assert answer.status == 400
    assert answer.error["message"].startswith("ValidationException: This model")
    assert len(fake.requests) == 1


def test_a_wrong_signature_is_an_auth_failure_that_escalates(
    sidecar: SidecarProcess, fake: FakeBedrock
) -> None:
    answer, headers = completion(sidecar, {"model": "slot:signed_wrong", "messages": HELLO})
    assert headers["X-Ringside-Models-Tried"] == f"fc:bedwest/{MODEL},fc:bed2/{NOVA}"
    assert answer.model == NOVA
    assert "InvalidSignatureException" in sidecar.stderr()  # the provider's words: in the log


def test_structured_output_with_one_reprompt(sidecar: SidecarProcess, fake: FakeBedrock) -> None:
    fake.script(
        BedrockReply(text="", stop_reason="tool_use",
                     tool_uses=[ToolUse("person", {"name": "Ada"})]),
        BedrockReply(text="", stop_reason="tool_use",
                     tool_uses=[ToolUse("person", {"name": "Ada", "age": 36})]),
    )  # fmt: skip
    answer, headers = completion(
        sidecar, {"model": f"fc:bed/{MODEL}", "messages": HELLO, "response_format": PERSON}
    )
    assert json.loads(answer.choices[0].message.content or "") == {"name": "Ada", "age": 36}
    assert answer.choices[0].finish_reason == "stop"
    assert headers["X-Ringside-Schema-Reprompts"] == "1"
    first, second = (seen["body"] for seen in fake.requests)
    assert first["toolConfig"]["toolChoice"] == {"tool": {"name": "person"}}
    assert second["messages"][1]["role"] == "assistant"
    assert second["messages"][1]["content"] == [{"text": '{"name":"Ada"}'}]
    assert "age" in second["messages"][2]["content"][0]["text"]  # the validation errors


def test_structured_output_streams_the_answer_tool_as_content(
    sidecar: SidecarProcess, fake: FakeBedrock
) -> None:
    fake.script(
        BedrockReply(text="", stop_reason="tool_use",
                     tool_uses=[ToolUse("person", {"name": "Ada", "age": 36})])
    )  # fmt: skip
    got = chunks(
        sidecar, {"model": f"fc:bed/{MODEL}", "messages": HELLO, "response_format": PERSON}
    )
    text = "".join(c.choices[0].delta.content or "" for c in got if c.choices)
    assert json.loads(text) == {"name": "Ada", "age": 36}
    assert got[-1].choices[0].finish_reason == "stop"


def test_usage_and_cost_count_cache_tokens_as_prompt(
    sidecar: SidecarProcess, fake: FakeBedrock
) -> None:
    fake.script(BedrockReply(input_tokens=100, output_tokens=20, cache_read=800, cache_write=100))
    answer, headers = completion(sidecar, {"model": f"fc:bed/{MODEL}", "messages": HELLO})
    assert answer.usage is not None and answer.usage.prompt_tokens == 1000
    assert answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == 800
    assert float(headers["X-Ringside-Cost-USD"]) == pytest.approx((1000 * 1.0 + 20 * 5.0) / 1e6)
    samples = metric_samples(sidecar)
    labels = {"provider": "bed", "model": f"fc:bed/{MODEL}"}
    assert metric(samples, "ringside_tokens_total", **labels, kind="prompt") >= 1000


def test_an_exception_mid_stream_ends_the_stream_with_an_error_event(
    sidecar: SidecarProcess, fake: FakeBedrock
) -> None:
    fake.script(BedrockReply(exception_after="modelStreamErrorException", message="model broke"))
    answer = post_chat(sidecar, {"model": f"fc:bed/{MODEL}", "messages": HELLO, "stream": True})
    assert answer.status == 200
    last = json.loads(sse_events(answer.body)[-1])
    assert "model broke" in last["error"]["message"]


# -- credentials from elsewhere in the chain ------------------------------------------------------


def test_a_wrong_secret_is_refused_by_the_signature_check_and_escalates(
    bedrock_server: FakeBedrock, fake: FakeBedrock, fake_openai: Any, sidecar_factory: Any
) -> None:
    config = {
        "storage": {"backend": "memory"},
        "providers": {
            "bed": provider(bedrock_server.url),
            "openai": {
                "kind": "openai",
                "base_url": fake_openai.url,
                "api_key_env": "TEST_OPENAI_KEY",
            },
        },
        "slots": {"chat": [f"fc:bed/{MODEL}", "fc:openai/gpt-4o-mini"]},
    }
    proc = sidecar_factory(config, {**AWS_ENV, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    answer = post_chat(proc, {"model": "slot:chat", "messages": HELLO})
    assert answer.status == 200, answer.body
    assert answer.headers["X-Ringside-Model-Used"] == "fc:openai/gpt-4o-mini"
    assert fake.requests == []  # refused at the signature, before the body was looked at


def test_container_credentials_as_eks_pod_identity_serves_them(
    bedrock_server: FakeBedrock, fake: FakeBedrock, sidecar_factory: Any
) -> None:
    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    served: list[str] = []

    async def credentials(request: web.Request) -> web.Response:
        served.append(request.headers.get("Authorization", ""))
        return web.json_response(
            {"AccessKeyId": "ASIAPODIDENTITY00001", "SecretAccessKey": "pod-secret",
             "Token": "pod-session-token", "Expiration": expiry}
        )  # fmt: skip

    def app() -> web.Application:
        application = web.Application()
        application.router.add_get("/v1/credentials", credentials)
        return application

    agent = ThreadedServer(app).start()
    try:
        bedrock_server.add_credentials("ASIAPODIDENTITY00001", "pod-secret", "pod-session-token")
        env = {
            **{k: v for k, v in AWS_ENV.items() if not k.startswith("AWS_ACCESS")},
            "AWS_ACCESS_KEY_ID": "",
            "AWS_SECRET_ACCESS_KEY": "",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{agent.url}/v1/credentials",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": "pod-identity-token",
        }
        config = {"storage": {"backend": "memory"},
                  "providers": {"bed": provider(bedrock_server.url)}}  # fmt: skip
        proc = sidecar_factory(config, env)
        answer = post_chat(proc, {"model": f"fc:bed/{MODEL}", "messages": HELLO})
        assert answer.status == 200, answer.body
        assert served == ["pod-identity-token"]
        (seen,) = fake.requests
        assert seen["headers"]["X-Amz-Security-Token"] == "pod-session-token"
    finally:
        agent.stop()
