"""The `azure` kind (Azure OpenAI) through a real sidecar and the official `openai` SDK, against
a fake Azure resource that checks every request (tests/upstreams/azure_fake.py): both URL forms,
the deployments mapping, api-key and Entra ID bearer credentials (a rotated token file is picked
up), streams, tools, content-filter refusals and filtered answers, escalation in a cascade, and
the configs refused at load. Every answer validates as an OpenAI chat.completion / chunk."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from sidecar.providers.azure import (
    TOKEN_CHECK_SECONDS,
    AzureStreamDecoder,
    TokenFile,
    azure_retry_after,
)
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
from tests.upstreams.azure_fake import (
    UNDERLYING_MODEL,
    AzureReply,
    FakeAzure,
    content_filter_error,
    rate_limited,
)

AZURE_KEY = "azure-resource-key-0123456789"
ENV_TOKEN = "entra-token-from-env"
FILE_TOKENS = ("entra-token-file-1", "entra-token-file-2")
VERSION = "2024-10-21"
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
WEATHER_CALL: Any = {
    "id": "call_abc123",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
}


@pytest.fixture(scope="module")
def azure() -> Iterator[FakeAzure]:
    fake = FakeAzure(
        AZURE_KEY,
        tokens={ENV_TOKEN, *FILE_TOKENS},
        deployments={"mini-prod", "big-prod", "plain", "gpt-4o-mini"},
    )
    fake.server.start()
    yield fake
    fake.server.stop()


@pytest.fixture
def fake(azure: FakeAzure) -> Iterator[FakeAzure]:
    azure.reset()
    yield azure
    assert azure.problems == []


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("entra") / "token"
    path.write_text(FILE_TOKENS[0] + "\n")
    return path


def provider(url: str, **fields: Any) -> dict[str, Any]:
    return {"kind": "azure", "base_url": url, "timeout": {"connect": 2, "read": 5}, **fields}


@pytest.fixture(scope="module")
def sidecar(
    azure: FakeAzure, token_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    key = {"api_key_env": "AZ_KEY"}
    config = {
        "storage": {"backend": "memory"},
        "providers": {
            "azdep": provider(
                azure.url, api_version=VERSION, deployments={"gpt-4o-mini": "mini-prod"}, **key
            ),
            "azv1": provider(azure.url, deployments={"gpt-4o": "big-prod"}, **key),
            "azpreview": provider(azure.url, api_version="preview", **key),
            "azfile": provider(azure.url, api_version=VERSION, token_file=str(token_file)),
            "azenv": provider(azure.url, token_env="AZ_TOKEN"),
        },
        "models": {
            "fc:azdep/gpt-4o-mini": {
                "input_per_mtok": 0.15,
                "output_per_mtok": 0.6,
                "caps": ["tools", "json_schema", "vision"],
            },
            "fc:azv1/gpt-4o": {"input_per_mtok": 2.5, "output_per_mtok": 10.0},
        },
        "slots": {"chat": ["fc:azdep/gpt-4o-mini", "fc:azv1/gpt-4o"]},
        "passthrough": {"/v1/files": "azv1", "/v1/batches": "azfile"},
    }
    env = {"AZ_KEY": AZURE_KEY, "AZ_TOKEN": ENV_TOKEN}
    workdir = tmp_path_factory.mktemp("azure")
    yield from module_sidecar(workdir, without_circuit_breakers(config), env)


def raw_completion(proc: SidecarProcess, body: dict[str, Any]) -> ChatCompletion:
    """The sidecar's answer, validated strictly (the SDK's own parsing is lenient)."""
    answer = post_chat(proc, body)
    assert answer.status == 200, answer.body
    return ChatCompletion.model_validate(answer.json())


def raw_chunks(proc: SidecarProcess, body: dict[str, Any]) -> list[ChatCompletionChunk]:
    answer = post_chat(proc, {**body, "stream": True})
    assert answer.status == 200, answer.body
    events = sse_events(answer.body)
    assert events[-1] == "[DONE]"
    return [ChatCompletionChunk.model_validate_json(event) for event in events[:-1]]


# -- URLs, deployments, credentials --------------------------------------------------------------


def test_deployment_form_calls_the_mapped_deployment_with_api_version_and_api_key(
    sidecar: SidecarProcess, fake: FakeAzure
) -> None:
    answer = sdk(sidecar).chat.completions.create(model="fc:azdep/gpt-4o-mini", messages=HELLO)
    assert answer.choices[0].message.content == "Hello from the fake Azure deployment."
    (seen,) = fake.received
    assert seen.path == "/openai/deployments/mini-prod/chat/completions"
    assert seen.query == {"api-version": VERSION}
    assert seen.headers["api-key"] == AZURE_KEY
    assert "Authorization" not in seen.headers
    assert seen.body["messages"] == HELLO


def test_v1_form_names_the_deployment_in_the_body_and_sends_no_api_version(
    sidecar: SidecarProcess, fake: FakeAzure
) -> None:
    sdk(sidecar).chat.completions.create(model="fc:azv1/gpt-4o", messages=HELLO)
    (seen,) = fake.received
    assert seen.path == "/openai/v1/chat/completions"
    assert seen.query == {}
    assert seen.body["model"] == "big-prod"
    assert seen.headers["api-key"] == AZURE_KEY


def test_v1_preview_sends_api_version_preview(sidecar: SidecarProcess, fake: FakeAzure) -> None:
    sdk(sidecar).chat.completions.create(model="fc:azpreview/plain", messages=HELLO)
    (seen,) = fake.received
    assert (seen.path, seen.query) == ("/openai/v1/chat/completions", {"api-version": "preview"})


def test_a_model_not_in_deployments_is_its_own_deployment(
    sidecar: SidecarProcess, fake: FakeAzure
) -> None:
    sdk(sidecar).chat.completions.create(model="fc:azdep/plain", messages=HELLO)
    assert fake.received[0].path == "/openai/deployments/plain/chat/completions"


def test_a_deployment_azure_does_not_have_is_its_404_not_an_outage(
    sidecar: SidecarProcess, fake: FakeAzure
) -> None:
    answer = post_chat(sidecar, {"model": "fc:azdep/missing", "messages": HELLO})
    assert answer.status == 404
    assert answer.error["code"] == "DeploymentNotFound"


def test_token_env_is_sent_as_an_entra_id_bearer(sidecar: SidecarProcess, fake: FakeAzure) -> None:
    sdk(sidecar).chat.completions.create(model="fc:azenv/plain", messages=HELLO)
    (seen,) = fake.received
    assert seen.headers["Authorization"] == f"Bearer {ENV_TOKEN}"
    assert "api-key" not in seen.headers


def test_a_rotated_token_file_is_picked_up(
    sidecar: SidecarProcess, fake: FakeAzure, token_file: Path
) -> None:
    client = sdk(sidecar)
    client.chat.completions.create(model="fc:azfile/plain", messages=HELLO)
    assert fake.received[-1].headers["Authorization"] == f"Bearer {FILE_TOKENS[0]}"
    fresh = token_file.with_suffix(".new")  # as the kubelet swaps a mounted file: a new inode
    fresh.write_text(FILE_TOKENS[1])
    os.replace(fresh, token_file)
    time.sleep(TOKEN_CHECK_SECONDS + 0.2)
    client.chat.completions.create(model="fc:azfile/plain", messages=HELLO)
    assert fake.received[-1].headers["Authorization"] == f"Bearer {FILE_TOKENS[1]}"
    assert FILE_TOKENS[0] not in sidecar.stderr() + sidecar.stdout()


# -- pass-through paths ------------------------------------------------------------------------
def test_a_passthrough_path_reaches_the_v1_api_with_the_api_key(
    sidecar: SidecarProcess, fake: FakeAzure
) -> None:
    listed = sdk(sidecar).files.list()
    assert listed.data == []
    (seen,) = fake.received
    assert seen.path == "/openai/v1/files" and seen.query == {}
    assert seen.headers["api-key"] == AZURE_KEY and "Authorization" not in seen.headers


def test_a_passthrough_path_of_a_dated_version_carries_it_and_the_token_file(
    sidecar: SidecarProcess, fake: FakeAzure
) -> None:
    sdk(sidecar).batches.list(limit=2)
    (seen,) = fake.received
    assert seen.path == "/openai/batches"
    assert seen.query == {"api-version": VERSION, "limit": "2"}
    assert seen.headers["Authorization"].removeprefix("Bearer ") in FILE_TOKENS
    assert "api-key" not in seen.headers


# -- answers -------------------------------------------------------------------------------------


def test_answers_with_azure_filter_results_validate_as_chat_completion(
    sidecar: SidecarProcess, fake: FakeAzure
) -> None:
    completion = raw_completion(sidecar, {"model": "fc:azdep/gpt-4o-mini", "messages": HELLO})
    assert completion.model == UNDERLYING_MODEL
    assert completion.usage is not None and completion.usage.total_tokens == 21
    extra = completion.model_extra or {}
    assert extra["prompt_filter_results"][0]["prompt_index"] == 0  # Azure's extras pass through


def test_stream_drops_azure_annotation_events_and_every_chunk_validates(
    sidecar: SidecarProcess, fake: FakeAzure
) -> None:
    fake.script(AzureReply(content="one two three four", chunks=4, async_filter_events=True))
    chunks = raw_chunks(sidecar, {"model": "fc:azdep/gpt-4o-mini", "messages": HELLO})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    assert all(chunk.object == "chat.completion.chunk" and chunk.id for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in chunks)  # asked for by the sidecar, not the client
    assert fake.received[0].body["stream_options"] == {"include_usage": True}


def test_stream_with_include_usage_ends_with_the_usage_chunk(
    sidecar: SidecarProcess, fake: FakeAzure
) -> None:
    stream = sdk(sidecar).chat.completions.create(
        model="fc:azv1/gpt-4o", messages=HELLO, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 13


def test_tool_call_round_trip(sidecar: SidecarProcess, fake: FakeAzure) -> None:
    client = sdk(sidecar)
    fake.script(AzureReply(tool_calls=[WEATHER_CALL], finish_reason="tool_calls"))
    first = client.chat.completions.create(
        model="fc:azdep/gpt-4o-mini", messages=HELLO, tools=[WEATHER_TOOL],
        tool_choice="auto",
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.arguments == '{"city": "Oslo"}'
    messages: list[Any] = [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 4}'},
    ]
    client.chat.completions.create(
        model="fc:azdep/gpt-4o-mini", messages=messages, tools=[WEATHER_TOOL]
    )
    second = fake.received[1].body
    assert second["tools"] == [WEATHER_TOOL]
    assert second["messages"][2] == messages[2]


def test_streamed_tool_call(sidecar: SidecarProcess, fake: FakeAzure) -> None:
    fake.script(AzureReply(tool_calls=[WEATHER_CALL], finish_reason="tool_calls"))
    body = {"model": "fc:azv1/gpt-4o", "messages": HELLO, "tools": [WEATHER_TOOL]}
    chunks = raw_chunks(sidecar, body)
    calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or ()]
    assert calls[0].function is not None and calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_vision_part_goes_through_unchanged(sidecar: SidecarProcess, fake: FakeAzure) -> None:
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, part]}]
    raw_completion(sidecar, {"model": "fc:azdep/gpt-4o-mini", "messages": messages})
    assert fake.received[0].body["messages"] == messages


# -- content filter ------------------------------------------------------------------------------


def test_a_prompt_the_content_filter_refuses_is_a_400_content_filter(
    sidecar: SidecarProcess, fake: FakeAzure
) -> None:
    fake.script(content_filter_error("violence"))
    answer = post_chat(sidecar, {"model": "slot:chat", "messages": HELLO})
    assert answer.status == 400
    error = answer.error
    assert (error["code"], error["type"], error["param"]) == (
        "content_filter", "invalid_request_error", "messages",
    )  # fmt: skip
    assert "violence (medium)" in error["message"]
    assert "content management policy" in error["message"]
    assert len(fake.received) == 1  # the cascade does not go around the content policy
    assert answer.headers["X-Ringside-Fallback-Triggered"] == "false"


def test_a_streamed_prompt_the_content_filter_refuses_is_the_same_400_before_any_chunk(
    sidecar: SidecarProcess, fake: FakeAzure
) -> None:
    fake.script(content_filter_error("self_harm"))
    body = {"model": "fc:azv1/gpt-4o", "messages": HELLO, "stream": True}
    answer = post_chat(sidecar, body)
    assert answer.status == 400
    assert answer.error["code"] == "content_filter"
    assert "self_harm (medium)" in answer.error["message"]


def test_an_answer_the_output_filter_cut_keeps_finish_reason_content_filter(
    sidecar: SidecarProcess, fake: FakeAzure
) -> None:
    fake.script(AzureReply(filtered_category="sexual"))
    completion = raw_completion(sidecar, {"model": "fc:azdep/gpt-4o-mini", "messages": HELLO})
    assert completion.choices[0].finish_reason == "content_filter"
    assert completion.choices[0].message.content is None


def test_a_stream_the_output_filter_cut_ends_with_finish_reason_content_filter(
    sidecar: SidecarProcess, fake: FakeAzure
) -> None:
    fake.script(AzureReply(filtered_category="hate"))
    chunks = raw_chunks(sidecar, {"model": "fc:azv1/gpt-4o", "messages": HELLO})
    assert chunks[-1].choices[0].finish_reason == "content_filter"


# -- escalation ----------------------------------------------------------------------------------


def test_a_429_escalates_to_the_next_candidate(sidecar: SidecarProcess, fake: FakeAzure) -> None:
    fake.script(rate_limited())
    answer = post_chat(sidecar, {"model": "slot:chat", "messages": HELLO})
    assert answer.status == 200, answer.body
    ChatCompletion.model_validate(answer.json())
    assert answer.headers["X-Ringside-Model-Used"] == "fc:azv1/gpt-4o"
    assert answer.headers["X-Ringside-Fallback-Triggered"] == "true"
    assert [r.path for r in fake.received] == [
        "/openai/deployments/mini-prod/chat/completions",
        "/openai/v1/chat/completions",
    ]


def test_retry_after_ms_is_the_retry_after_of_an_exhausted_cascade(
    sidecar: SidecarProcess, fake: FakeAzure
) -> None:
    only_ms = rate_limited(2500)
    del only_ms.headers["retry-after"]
    fake.script(only_ms, rate_limited(1000))
    answer = post_chat(sidecar, {"model": "slot:chat", "messages": HELLO})
    assert answer.status == 503
    assert answer.error["code"] == "upstream_unavailable"
    assert answer.headers["Retry-After"] == "3"  # 2.5 s, in whole seconds


def test_a_5xx_escalates(sidecar: SidecarProcess, fake: FakeAzure) -> None:
    fake.script(AzureReply(status=500, error={"code": "InternalServerError", "message": "boom"}))
    answer = post_chat(sidecar, {"model": "slot:chat", "messages": HELLO})
    assert answer.status == 200
    assert answer.headers["X-Ringside-Model-Used"] == "fc:azv1/gpt-4o"


# -- config refusals -----------------------------------------------------------------------------

GOOD = """\
storage: {backend: memory}
providers:
  az:
    kind: azure
    base_url: https://myres.openai.azure.com
    api_key_env: AZ_KEY
    api_version: 2024-10-21
"""


def refused(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ringside.yaml"
    path.write_text(text)
    result = ringside("check-config", str(path), env={"AZ_KEY": "k"})
    assert result.returncode != 0, result.stdout
    return result.stderr


def test_the_good_config_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "ringside.yaml"
    path.write_text(GOOD)
    result = ringside("check-config", str(path), env={"AZ_KEY": "k"})
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("change", "key_path", "words"),
    [
        (("    base_url: https://myres.openai.azure.com\n", ""), "providers.az:",
         "no public endpoint"),
        (("myres.openai.azure.com", "myres.openai.azure.com/openai/deployments/x"),
         "providers.az.base_url:", "resource endpoint alone"),
        (("api_version: 2024-10-21", "api_version: v2"), "providers.az.api_version:",
         "no Azure OpenAI API version"),
        (("    api_key_env: AZ_KEY\n", "    api_key_env: AZ_KEY\n    token_env: AZ_TOKEN\n"),
         "providers.az.token_env:", "one credential"),
        (("    api_key_env: AZ_KEY\n", ""), "providers.az:", "needs a credential"),
        (("kind: azure", "kind: openai\n    token_file: /tmp/t"), "providers.az.token_file:",
         "only by the kinds azure"),
    ],
    ids=["no-base-url", "base-url-with-path", "bad-api-version", "two-credentials",
         "no-credential", "token-file-on-openai"],
)  # fmt: skip
def test_configs_azure_cannot_use_are_refused(
    tmp_path: Path, change: tuple[str, str], key_path: str, words: str
) -> None:
    old, new = change
    assert old in GOOD
    stderr = refused(tmp_path, GOOD.replace(old, new))
    lines = [line for line in stderr.splitlines() if f": {key_path} " in line]
    assert lines, stderr
    assert words in lines[0], lines[0]


# -- the adapter's parts, in process -------------------------------------------------------------


def test_retry_after_ms_wins_over_retry_after() -> None:
    assert azure_retry_after({"retry-after-ms": "250", "Retry-After": "3"}) == 0.25
    assert azure_retry_after({"Retry-After": "3"}) == 3.0
    assert azure_retry_after({"retry-after-ms": "soon"}) is None


def test_the_stream_decoder_keeps_usage_and_content_chunks() -> None:
    decoder = AzureStreamDecoder(wants_usage=False, keep_content=True)
    annotation = {"choices": [], "created": 0, "id": "", "model": "", "object": "",
                  "prompt_filter_results": []}  # fmt: skip
    assert decoder.feed(None, json.dumps(annotation).encode()) == []
    content = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None,
                            "content_filter_results": {}}]}  # fmt: skip
    assert len(decoder.feed(None, json.dumps(content).encode())) == 1
    usage = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1,
                                      "total_tokens": 3}}  # fmt: skip
    decoder.feed(None, json.dumps(usage).encode())
    assert decoder.content == "hi"
    assert decoder.usage is not None and decoder.usage.total_tokens == 3


def test_a_token_file_emptied_mid_rotation_keeps_the_previous_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first-token")
    now = [0.0]
    tokens = TokenFile(str(path), clock=lambda: now[0])
    assert tokens.current() == "first-token"
    path.write_text("")
    now[0] += TOKEN_CHECK_SECONDS
    assert tokens.current() == "first-token"
    path.write_text("second-token\n")
    os.utime(path, ns=(1, 1))  # a new identity even within the file system's mtime resolution
    now[0] += TOKEN_CHECK_SECONDS
    assert tokens.current() == "second-token"


def test_client_chosen_deployment_urls_do_not_grow_the_url_cache_without_bound() -> None:
    from sidecar.http1.client import MAX_CACHED_URLS, Http1Client

    egress = Http1Client(environ={}).egress()
    for n in range(MAX_CACHED_URLS + 10):
        egress.target(f"https://res.openai.azure.com/openai/deployments/d{n}/chat/completions")
    assert len(egress._targets) <= MAX_CACHED_URLS
