"""The fake OpenAI upstream itself, driven by the official SDK: the other tests rely on it."""

from __future__ import annotations

import time

import openai
import pytest

from tests.support import HELLO, request, sse_events
from tests.upstreams.openai_fake import FakeOpenAI, Reply


def client(fake: FakeOpenAI) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.url, api_key="sk-direct", max_retries=0, timeout=5)


def test_fake_answers_a_completion_with_usage_and_records_the_request(
    fake_openai: FakeOpenAI,
) -> None:
    completion = client(fake_openai).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert completion.choices[0].message.content == "Hello from the fake upstream."
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (11, 7)
    assert fake_openai.models_called() == ["gpt-4o-mini"]
    assert fake_openai.received[0].headers["Authorization"] == "Bearer sk-direct"


def test_fake_streams_chunks_then_usage_when_asked(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Reply(content="abcdef", chunks=3))
    chunks = list(
        client(fake_openai).chat.completions.create(
            model="gpt-4o-mini",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "abcdef"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 18


def test_fake_stream_ends_with_done(fake_openai: FakeOpenAI) -> None:
    answer = request(
        fake_openai.server.url,
        "POST",
        "/v1/chat/completions",
        {"model": "m", "messages": HELLO, "stream": True},
    )
    assert sse_events(answer.body)[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("status", "exception"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (403, openai.PermissionDeniedError),
        (404, openai.NotFoundError),
        (408, openai.APIStatusError),
        (422, openai.UnprocessableEntityError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (502, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
def test_fake_answers_each_error_status_in_the_openai_envelope(
    fake_openai: FakeOpenAI, status: int, exception: type[openai.APIStatusError]
) -> None:
    fake_openai.script(Reply(status=status, error_code="some_code", error_message="nope"))
    with pytest.raises(exception) as caught:
        client(fake_openai).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert caught.value.status_code == status
    assert caught.value.code == "some_code"
    assert caught.value.body == {
        "message": "nope",
        "type": "server_error",
        "param": None,
        "code": "some_code",
    }


def test_fake_waits_before_answering_when_slow(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Reply(delay=0.4))
    started = time.monotonic()
    client(fake_openai).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert time.monotonic() - started >= 0.4


def test_fake_drops_the_connection_on_reset(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Reply(reset=True))
    with pytest.raises(openai.APIConnectionError):
        client(fake_openai).chat.completions.create(model="gpt-4o-mini", messages=HELLO)


def test_fake_replies_by_model_and_script_queue_first(fake_openai: FakeOpenAI) -> None:
    fake_openai.on_model("gpt-4o", Reply(content="big"))
    fake_openai.script(Reply(content="scripted"))
    sdk = client(fake_openai)
    first = sdk.chat.completions.create(model="gpt-4o", messages=HELLO)
    second = sdk.chat.completions.create(model="gpt-4o", messages=HELLO)
    third = sdk.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert [first.choices[0].message.content, second.choices[0].message.content] == [
        "scripted",
        "big",
    ]
    assert third.choices[0].message.content == "Hello from the fake upstream."
