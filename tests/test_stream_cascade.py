"""A slot or `match:…,n=K` cascade streams (SPEC 2.2): it escalates on failures until the first
chunk that delivers something reaches the client; after that a failure ends the stream with
an SSE error event. `model` as an array + stream stays 400 (the client asked for both)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import openai_config
from tests.procs import SidecarProcess
from tests.support import (
    HELLO,
    metric_samples,
    module_sidecar,
    post_chat,
    sdk,
    sse_events,
    without_circuit_breakers,
)
from tests.upstreams.openai_fake import FakeOpenAI, Reply

FIRST, SECOND = "fc:openai/gpt-4o-mini", "fc:openai/gpt-4o"


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    config = without_circuit_breakers(
        openai_config(_openai_server.url, slots={"chat": [FIRST, SECOND]})
    )
    yield from module_sidecar(tmp_path_factory.mktemp("stream-cascade"), config)


def fallbacks(gateway: SidecarProcess) -> float:
    samples = metric_samples(gateway).items()
    return sum(value for (name, _labels), value in samples if name == "ringside_fallbacks_total")


def streamed_text(events: list[str]) -> str:
    return "".join(
        json.loads(e)["choices"][0]["delta"].get("content") or ""
        for e in events
        if e.startswith("{") and json.loads(e).get("choices")
    )


def test_a_slot_streams_from_its_first_model_when_it_answers(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model("gpt-4o-mini", Reply(content="first answers"))
    stream = sdk(gateway).chat.completions.with_raw_response.create(
        model="slot:chat", messages=HELLO, stream=True
    )
    assert stream.headers["X-Ringside-Model-Used"] == FIRST
    assert stream.headers["X-Ringside-Fallback-Triggered"] == "false"
    chunks = list(stream.parse())  # each one parsed by the SDK as a ChatCompletionChunk
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "first answers"
    )
    assert [r.body["model"] for r in fake_openai.received] == ["gpt-4o-mini"]


def test_a_failure_before_the_first_chunk_escalates_to_the_next_model(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model("gpt-4o-mini", Reply(status=503))
    fake_openai.on_model("gpt-4o", Reply(content="second answers"))
    stream = sdk(gateway).chat.completions.with_raw_response.create(
        model="slot:chat", messages=HELLO, stream=True
    )
    assert stream.headers["X-Ringside-Models-Tried"] == f"{FIRST},{SECOND}"
    assert stream.headers["X-Ringside-Model-Used"] == SECOND
    assert stream.headers["X-Ringside-Fallback-Triggered"] == "true"
    text = "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)
    assert text == "second answers"


@pytest.mark.parametrize(
    "broken", [Reply(error_after_chunks=0), Reply(reset_after_chunks=0)], ids=["error", "reset"]
)
def test_a_failure_after_the_role_chunk_but_before_content_still_escalates(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, broken: Reply
) -> None:
    """OpenAI's first chunk carries only the role: the client has seen nothing it can show,
    so the cascade may still move on, and the client gets one clean stream."""
    fake_openai.on_model("gpt-4o-mini", broken)
    fake_openai.on_model("gpt-4o", Reply(content="clean from the second"))
    before = fallbacks(gateway)
    answer = post_chat(gateway, {"model": "slot:chat", "messages": HELLO, "stream": True})
    assert answer.status == 200
    assert answer.headers["X-Ringside-Model-Used"] == SECOND
    events = sse_events(answer.body)
    assert events[-1] == "[DONE]"
    assert not any(e.startswith('{"error"') for e in events)
    roles = [e for e in events[:-1] if json.loads(e)["choices"][0]["delta"].get("role")]
    assert len(roles) == 1  # one stream, not the start of two
    assert streamed_text(events) == "clean from the second"
    assert fallbacks(gateway) == before + 1


def test_a_failure_after_content_ends_the_stream_with_an_error_event(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model("gpt-4o-mini", Reply(content="abcdef", chunks=3, error_after_chunks=1))
    answer = post_chat(gateway, {"model": "slot:chat", "messages": HELLO, "stream": True})
    assert answer.status == 200
    assert answer.headers["X-Ringside-Models-Tried"] == FIRST  # no escalation once content left
    events = sse_events(answer.body)
    assert json.loads(events[-1])["error"]["code"] == "upstream_unavailable"
    assert streamed_text(events[:-1]) == "ab"
    assert [r.body["model"] for r in fake_openai.received] == ["gpt-4o-mini"]


def test_every_model_failing_before_content_is_one_json_error(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model("gpt-4o-mini", Reply(status=503))
    fake_openai.on_model("gpt-4o", Reply(error_after_chunks=0))
    answer = post_chat(gateway, {"model": "slot:chat", "messages": HELLO, "stream": True})
    assert answer.status == 503
    assert answer.error["code"] == "upstream_unavailable"
    assert answer.headers["X-Ringside-Models-Tried"] == f"{FIRST},{SECOND}"


def test_a_client_error_does_not_escalate(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    fake_openai.on_model(
        "gpt-4o-mini", Reply(status=400, error_code="invalid_value", error_type="invalid_request")
    )
    answer = post_chat(gateway, {"model": "slot:chat", "messages": HELLO, "stream": True})
    assert answer.status == 400
    assert [r.body["model"] for r in fake_openai.received] == ["gpt-4o-mini"]


def test_match_n_streams_cheapest_first_with_fallback(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model("gpt-4o-mini", Reply(status=429))
    fake_openai.on_model("gpt-4o", Reply(content="from the dearer one"))
    answer = post_chat(
        gateway, {"model": "match:provider=openai,n=2", "messages": HELLO, "stream": True}
    )
    assert answer.status == 200
    assert answer.headers["X-Ringside-Models-Tried"] == f"{FIRST},{SECOND}"
    assert streamed_text(sse_events(answer.body)) == "from the dearer one"


def test_model_as_an_array_with_stream_is_still_refused(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gateway).chat.completions.create(
            model=[FIRST, SECOND],  # type: ignore[arg-type]
            messages=HELLO,  # type: ignore[arg-type]
            stream=True,
        )
    assert caught.value.code == "fallback_with_stream_unsupported"
    assert fake_openai.received == []
