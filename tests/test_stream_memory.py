"""A stream's content is kept only when it is validated at the end: a long stream must not cost
its whole length in sidecar memory, and its missing usage is still estimated from what it
produced (issue 16: unread streams)."""

from __future__ import annotations

import json
from collections.abc import Callable

import orjson

from sidecar.providers.openai_compat import OpenAIStreamDecoder
from tests.procs import SidecarProcess, wait_until
from tests.support import post_chat, sse_events
from tests.test_budget import ADMIN_ENV, PRICED, budget_config, usage_of
from tests.upstreams.openai_fake import FakeOpenAI, Reply


def chunk(content: str) -> bytes:
    return orjson.dumps(
        {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": content}}],
        }
    )


def test_a_decoder_counts_the_content_it_does_not_keep() -> None:
    plain, kept = OpenAIStreamDecoder(False), OpenAIStreamDecoder(False, keep_content=True)
    for decoder in (plain, kept):
        for _ in range(1000):
            decoder.feed(None, chunk("x" * 100))
    assert (plain.content, plain.produced) == ("", 100_000)
    assert (kept.content, kept.produced) == ("x" * 100_000, 100_000)


def test_a_stream_without_usage_is_charged_from_what_it_produced(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    pieces = [
        b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1,
                                "model": "priced", "choices": [{"index": 0, "delta":
                                {"content": "y" * 400}, "finish_reason": None}]}).encode()
        for _ in range(10)
    ]  # fmt: skip
    raw = b"\n\n".join([*pieces, b"data: [DONE]", b""])
    fake_openai.on_model(
        "priced",
        Reply(raw_body=raw),  # SSE without a usage chunk
    )
    proc = sidecar_factory(
        budget_config(fake_openai.url, {"backend": "memory"}, acme=1.0), ADMIN_ENV
    )

    answer = post_chat(
        proc,
        {"model": PRICED, "messages": [{"role": "user", "content": "hi"}], "stream": True},
        {"FC-Customer": "acme"},
    )

    assert answer.status == 200 and sse_events(answer.body)[-1] == "[DONE]"
    report = wait_until(lambda: (u := usage_of(proc, "acme"))["requests"] == 1 and u)
    assert report["tokens"]["output"] == 1000  # 4,000 characters: a token per 4
    assert report["spent_usd"] > 0
