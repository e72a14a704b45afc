"""Streaming (SPEC 2.4): chunks and usage intact, headers first, errors before and after the first
chunk, and an upstream call cancelled when the client goes away."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator

import pytest

from tests.conftest import openai_config
from tests.procs import SidecarProcess, wait_until
from tests.support import (
    CHAT,
    HELLO,
    async_sdk,
    module_sidecar,
    post_chat,
    sdk,
    sse_events,
    without_circuit_breakers,
)
from tests.upstreams.openai_fake import FakeOpenAI, Reply

MINI = "fc:openai/gpt-4o-mini"


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    config = without_circuit_breakers(openai_config(_openai_server.url))
    yield from module_sidecar(tmp_path_factory.mktemp("stream"), config)


def stream_body(**extra: object) -> dict[str, object]:
    return {"model": MINI, "messages": HELLO, "stream": True, **extra}


def test_sync_stream_delivers_every_chunk_of_content(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content="one two three four five six", chunks=6))
    chunks = list(sdk(gateway).chat.completions.create(model=MINI, messages=HELLO, stream=True))
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(pieces) == "one two three four five six"
    assert len(pieces) == 6
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert {c.model for c in chunks} == {"gpt-4o-mini"}


async def test_async_stream_delivers_content(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    async with async_sdk(gateway) as client:
        stream = await client.chat.completions.create(model=MINI, messages=HELLO, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello from the fake upstream."


def test_stream_ends_with_done(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    answer = post_chat(gateway, stream_body())
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(answer.body)
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1


def test_stream_headers_carry_ringside_headers(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    raw = sdk(gateway).chat.completions.with_raw_response.create(
        model=MINI, messages=HELLO, stream=True, extra_headers={"X-Request-Id": "stream-req-1"}
    )
    assert raw.headers["X-Ringside-Model-Used"] == MINI
    assert raw.headers["X-Ringside-Models-Tried"] == MINI
    assert raw.headers["X-Ringside-Fallback-Triggered"] == "false"
    assert raw.headers["X-Request-Id"] == "stream-req-1"
    list(raw.parse())


def test_include_usage_is_honoured(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Reply(prompt_tokens=31, completion_tokens=9))
    chunks = list(
        sdk(gateway).chat.completions.create(
            model=MINI, messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
    )
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1
    assert usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    assert (usage_chunks[0].usage.prompt_tokens, usage_chunks[0].usage.completion_tokens) == (31, 9)


def test_usage_chunk_the_sidecar_asked_for_is_stripped(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(gateway, stream_body())
    chunks = [json.loads(e) for e in sse_events(answer.body) if e != "[DONE]"]
    assert fake_openai.received[0].body["stream_options"] == {"include_usage": True}
    assert all(chunk["choices"] for chunk in chunks)
    assert not [chunk for chunk in chunks if "usage" in chunk]  # not even "usage": null


def test_usage_is_tracked_when_the_client_did_not_ask(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(prompt_tokens=40, completion_tokens=12))
    post_chat(gateway, stream_body(), {"X-Request-Id": "stream-usage-untold"})
    line = wait_until(
        lambda: [r for r in gateway.access_log() if r["request_id"] == "stream-usage-untold"]
    )[0]
    assert (line["tokens_in"], line["tokens_out"]) == (40, 12)


def test_a_stream_chunk_over_a_megabyte_arrives_intact(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    content = "0123456789abcdef" * 80_000  # 1.28 MB in one SSE event
    fake_openai.script(Reply(content=content, chunks=1))
    answer = post_chat(gateway, stream_body())
    assert answer.status == 200
    events = sse_events(answer.body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == content


def test_upstream_error_before_the_first_chunk_is_a_json_error(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(status=500, error_message="engine on fire"))
    answer = post_chat(gateway, stream_body())
    assert answer.status == 503
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.error["code"] == "upstream_unavailable"
    assert "engine on fire" in answer.error["message"]
    assert answer.headers["X-Ringside-Models-Tried"] == MINI


def test_upstream_client_fault_before_the_first_chunk_keeps_its_status(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(
        Reply(status=400, error_code="invalid_value", error_message="logprobs: bad value")
    )
    answer = post_chat(gateway, stream_body())
    assert answer.status == 400
    assert answer.error["code"] == "invalid_value"
    assert answer.error["message"] == "logprobs: bad value"


def test_upstream_error_after_the_first_chunk_is_one_sse_error_event(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content="abcdef", chunks=3, error_after_chunks=1))
    answer = post_chat(gateway, stream_body())
    assert answer.status == 200
    events = sse_events(answer.body)
    errors = [json.loads(e) for e in events if e.startswith('{"error"')]
    assert len(errors) == 1
    assert json.loads(events[-1]) == errors[0]  # the last event: the stream ends there
    assert errors[0]["error"]["code"] == "upstream_unavailable"
    assert set(errors[0]["error"]) == {"message", "type", "param", "code"}
    assert "[DONE]" not in events
    content = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert content == "ab"


def test_upstream_reset_mid_stream_ends_with_an_sse_error_event(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content="abcdef", chunks=3, reset_after_chunks=2))
    answer = post_chat(gateway, stream_body())
    events = sse_events(answer.body)
    assert json.loads(events[-1])["error"]["code"] == "upstream_unavailable"
    assert "[DONE]" not in events


def test_sdk_raises_on_an_error_after_the_first_chunk(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    import openai

    fake_openai.script(Reply(content="abcdef", chunks=3, error_after_chunks=1))
    stream = sdk(gateway).chat.completions.create(model=MINI, messages=HELLO, stream=True)
    with pytest.raises(openai.APIError):
        list(stream)


def test_client_disconnect_cancels_the_upstream_within_a_second(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content="x" * 40, chunks=40, chunk_delay=0.25))
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    conn.request(
        "POST",
        CHAT,
        body=json.dumps(stream_body()).encode(),
        headers={"Content-Type": "application/json", "X-Request-Id": "walks-away"},
    )
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the stream has started
    response.close()
    conn.close()
    closed_at = time.monotonic()

    record = fake_openai.received[0]
    wait_until(lambda: record.disconnected, timeout=3)
    assert record.disconnected_at is not None
    assert record.disconnected_at - closed_at < 1.0


def test_client_disconnect_is_logged_and_charged_for_what_was_produced(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content="word " * 40, chunks=40, chunk_delay=0.1))
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    conn.request(
        "POST",
        CHAT,
        body=json.dumps(stream_body()).encode(),
        headers={"Content-Type": "application/json", "X-Request-Id": "walks-away-charged"},
    )
    response = conn.getresponse()
    for _ in range(8):  # role chunk and a few content chunks
        response.readline()
    response.close()
    conn.close()
    line = wait_until(
        lambda: [r for r in gateway.access_log() if r["request_id"] == "walks-away-charged"]
    )[0]
    assert line["status"] == 499
    assert line["tokens_out"] > 0
    assert line["cost_usd"] > 0


def test_cascade_with_stream_is_refused(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    answer = post_chat(gateway, stream_body(model=[MINI, "fc:openai/gpt-4o"]))
    assert answer.status == 400
    assert answer.error["code"] == "fallback_with_stream_unsupported"
    assert fake_openai.received == []
