"""POST /v1/chat/completions through the official OpenAI SDK, sync and async: what arrives, and
what the upstream receives."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PROVIDER_KEY, openai_config
from tests.procs import SidecarProcess
from tests.support import HELLO, async_sdk, module_sidecar, sdk
from tests.upstreams.openai_fake import FakeOpenAI, Reply

MINI = "fc:openai/gpt-4o-mini"


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    workdir: Path = tmp_path_factory.mktemp("chat")
    yield from module_sidecar(workdir, openai_config(_openai_server.url))


def test_sync_sdk_gets_content_and_usage_intact(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(
        Reply(content='Ünïcode ✓ and "quotes"', prompt_tokens=23, completion_tokens=5)
    )
    completion = sdk(gateway).chat.completions.create(model=MINI, messages=HELLO)
    assert completion.choices[0].message.content == 'Ünïcode ✓ and "quotes"'
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (23, 5, 28)


async def test_async_sdk_gets_content_and_usage_intact(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    async with async_sdk(gateway) as client:
        completion = await client.chat.completions.create(model=MINI, messages=HELLO)
    assert completion.choices[0].message.content == "Hello from the fake upstream."
    assert completion.usage is not None and completion.usage.total_tokens == 18


def test_body_model_is_the_providers_model_id(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    completion = sdk(gateway).chat.completions.create(model=MINI, messages=HELLO)
    assert completion.model == "gpt-4o-mini"
    assert fake_openai.received[0].body["model"] == "gpt-4o-mini"


def test_success_carries_ringside_headers(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    raw = sdk(gateway).chat.completions.with_raw_response.create(model=MINI, messages=HELLO)
    assert raw.headers["X-Ringside-Model-Used"] == MINI
    assert raw.headers["X-Ringside-Models-Tried"] == MINI
    assert raw.headers["X-Ringside-Fallback-Triggered"] == "false"
    assert re.fullmatch(r"[\x21-\x7e]{8,128}", raw.headers["X-Request-Id"])
    # 11 prompt tokens x $0.15/M + 7 completion tokens x $0.60/M
    assert float(raw.headers["X-Ringside-Cost-USD"]) == pytest.approx(11 * 0.15e-6 + 7 * 0.60e-6)


def test_request_ids_are_generated_fresh_per_request(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    client = sdk(gateway)
    first = client.chat.completions.with_raw_response.create(model=MINI, messages=HELLO)
    second = client.chat.completions.with_raw_response.create(model=MINI, messages=HELLO)
    assert first.headers["X-Request-Id"] != second.headers["X-Request-Id"]


def test_given_request_id_is_echoed(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    raw = sdk(gateway).chat.completions.with_raw_response.create(
        model=MINI, messages=HELLO, extra_headers={"X-Request-Id": "trace-42.abc"}
    )
    assert raw.headers["X-Request-Id"] == "trace-42.abc"


def test_upstream_gets_the_provider_key_not_the_clients(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    sdk(gateway, api_key="sk-client-secret").chat.completions.create(
        model=MINI, messages=HELLO, extra_headers={"FC-Customer": "cust_1", "FC-Trace": "x"}
    )
    headers = {k.lower(): v for k, v in fake_openai.received[0].headers.items()}
    assert headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert "sk-client-secret" not in " ".join(headers.values())
    assert not [name for name in headers if name.startswith("fc-")]


def test_unknown_parameters_pass_through_to_the_upstream(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    sdk(gateway).chat.completions.create(
        model=MINI,
        messages=HELLO,
        temperature=0.2,
        extra_body={"logit_bias": {"50256": -100}, "vendor_knob": {"depth": 3}},
    )
    body = fake_openai.received[0].body
    assert body["vendor_knob"] == {"depth": 3}
    assert body["logit_bias"] == {"50256": -100}
    assert body["temperature"] == 0.2
    assert body["messages"] == HELLO


def test_tool_calls_arrive_intact(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    fake_openai.script(Reply(tool_calls=[call], finish_reason="tool_calls"))
    completion = sdk(gateway).chat.completions.create(
        model=MINI,
        messages=HELLO,
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    assert choice.message.tool_calls[0].function.arguments == '{"city": "Paris"}'


def test_content_part_arrays_with_images_are_accepted(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        }
    ]
    sdk(gateway).chat.completions.create(model=MINI, messages=messages)  # type: ignore[arg-type]
    assert fake_openai.received[0].body["messages"] == messages


def test_tool_results_in_the_conversation_are_forwarded(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"}}  # fmt: skip
    messages = [
        HELLO[0],
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    sdk(gateway).chat.completions.create(model=MINI, messages=messages)  # type: ignore[arg-type]
    assert fake_openai.received[0].body["messages"] == messages


def test_malformed_request_id_is_replaced_by_a_generated_one(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    raw = sdk(gateway).chat.completions.with_raw_response.create(
        model=MINI, messages=HELLO, extra_headers={"X-Request-Id": "has spaces in it"}
    )
    assert raw.headers["X-Request-Id"] not in ("", "has spaces in it")
