"""A stream's charge is settled before its last event leaves: a client that has `[DONE]` (or
the error event that ends a stream) has been billed for what it got, so nothing after the end
(a `kill -9`, a lost connection to the store) can lose the charge of an answer delivered whole.

`SlowSettle` is a user addon whose `attempt_done` hook (run after the budget's settle, in the
same step) takes SLOW seconds: the end of the stream must wait for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sidecar.flow import Attempt, Flow
from tests.conftest import openai_config
from tests.procs import SidecarProcess
from tests.support import HELLO, REPO_ROOT, module_sidecar
from tests.upstreams.openai_fake import FakeOpenAI, Reply

MINI = "fc:openai/gpt-4o-mini"
SLOW = 0.4


class SlowSettle:
    async def attempt_done(self, flow: Flow, attempt: Attempt) -> None:
        await asyncio.sleep(SLOW)


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    config = openai_config(_openai_server.url, addons=["tests.test_stream_settle:SlowSettle"])
    config["providers"]["mock"] = {"kind": "mock"}  # the Responses API translated onto chat
    env = {"PYTHONPATH": str(REPO_ROOT)}
    yield from module_sidecar(tmp_path_factory.mktemp("stream-settle"), config, env)


def arrivals(
    gateway: SidecarProcess, path: str = "/v1/chat/completions", body: dict[str, Any] | None = None
) -> list[tuple[float, str]]:
    """Each SSE data line of a streamed answer and how long after the request it arrived."""
    body = body or {"model": MINI, "messages": HELLO, "stream": True}
    seen = []
    started = time.monotonic()
    with httpx.stream("POST", gateway.url + path, json=body, timeout=10) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                seen.append((time.monotonic() - started, line))
    return seen


@pytest.mark.parametrize(
    "reply",
    [Reply(content="a streamed answer"), Reply(content="cut short", error_after_chunks=1)],
    ids=["done", "failed"],
)
def test_the_last_event_leaves_after_the_attempt_is_settled(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, reply: Reply
) -> None:
    fake_openai.script(reply)
    seen = arrivals(gateway)
    end_at, end = seen[-1]
    assert end == "data: [DONE]" or '"upstream_unavailable"' in end, end
    assert end_at >= SLOW * 0.9  # the end waited for the settle and its hooks


def test_a_translated_responses_stream_ends_after_its_settle(gateway: SidecarProcess) -> None:
    """The Responses API onto chat (the mock): `response.completed` leaves after the settle."""
    body = {"model": "fc:mock/echo", "input": "hi", "stream": True}
    seen = arrivals(gateway, "/v1/responses", body)
    end_at, end = seen[-1]
    assert '"response.completed"' in end, end
    assert end_at >= SLOW * 0.9
