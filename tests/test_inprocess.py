"""The pipeline, the cascade and its retries, in process (issue 18: tests at two levels).

The api app runs on aiohttp's test server with the services `ringside serve` starts; the
mock provider answers in process. What the process-level tests see from outside (status,
headers, body) is checked here too, and what they cannot see: the hooks each addon was called
with, in order, and the attempts the cascade made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai.types.chat as chat_types
import pytest

from sidecar.flow import Attempt, Flow
from sidecar.routing import Estimate
from tests.inprocess import api_client, make_flow

MOCK: dict[str, Any] = {
    "listen": {"api": "127.0.0.1:8787", "admin": "127.0.0.1:8788"},
    "storage": {"backend": "memory"},
    "providers": {
        "mock": {
            "kind": "mock",
            "mock": {
                "default": {"content": "in process"},
                "models": {"down": {"fail_status": 503, "fail_message": "down by design"}},
            },
        },
        "retrying": {
            "kind": "mock",
            "retries": 2,
            "retry_backoff": 0.01,
            "mock": {"models": {"down": {"fail_status": 503, "fail_message": "still down"}}},
        },
    },
    "models": {
        "fc:mock/down": {"input_per_mtok": 0.1, "output_per_mtok": 0.4},
        "fc:mock/echo": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
    },
    "slots": {"chat": ["fc:mock/down", "fc:mock/echo"]},
    "addons": ["tests.test_inprocess:Recorder"],
}
HELLO = [{"role": "user", "content": "hi"}]


class Recorder:
    """Every hook call, in order: (hook, the attempt's model ref or None)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.flows: list[Flow] = []

    def headers(self, flow: Flow) -> None:
        self.calls.append(("headers", None))

    def request(self, flow: Flow) -> None:
        self.calls.append(("request", None))

    def routed(self, flow: Flow) -> None:
        self.calls.append(("routed", None))

    def attempt(self, flow: Flow, attempt: Attempt) -> None:
        self.calls.append(("attempt", attempt.candidate.ref))

    def attempt_done(self, flow: Flow, attempt: Attempt) -> None:
        self.calls.append(("attempt_done", attempt.candidate.ref))

    def response(self, flow: Flow) -> None:
        self.calls.append(("response", None))

    def error(self, flow: Flow) -> None:
        self.calls.append(("error", None))

    def done(self, flow: Flow) -> None:
        self.calls.append(("done", None))
        self.flows.append(flow)


def recorder(state: Any) -> Recorder:
    found = [addon for addon in state.runtime.pipeline.addons if isinstance(addon, Recorder)]
    assert len(found) == 1
    return found[0]


async def test_a_cascade_calls_every_hook_in_order(tmp_path: Path) -> None:
    async with api_client(tmp_path, MOCK) as (client, state):
        answer = await client.post(
            "/v1/chat/completions", json={"model": "slot:chat", "messages": HELLO}
        )
        assert answer.status == 200, await answer.text()
        completion = chat_types.ChatCompletion.model_validate(await answer.json())
        assert completion.choices[0].message.content == "in process"
        assert answer.headers["X-Ringside-Models-Tried"] == "fc:mock/down,fc:mock/echo"
        assert answer.headers["X-Ringside-Fallback-Triggered"] == "true"
        seen = recorder(state)
        assert seen.calls == [
            ("headers", None), ("request", None), ("routed", None),
            ("attempt", "fc:mock/down"), ("attempt_done", "fc:mock/down"),
            ("attempt", "fc:mock/echo"), ("attempt_done", "fc:mock/echo"),
            ("response", None), ("done", None),
        ]  # fmt: skip
        flow = seen.flows[-1]
        assert [attempt.error is not None for attempt in flow.attempts] == [True, False]
        assert flow.fallbacks == [("fc:mock/down", "fc:mock/echo", "upstream_unavailable")]
        assert flow.status == 200 and flow.model_used == "fc:mock/echo"


async def test_a_refused_request_runs_the_error_hooks_only(tmp_path: Path) -> None:
    async with api_client(tmp_path, MOCK) as (client, state):
        answer = await client.post(
            "/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert answer.status == 400
        body = await answer.json()
        assert body["error"]["code"] == "invalid_request"
        assert recorder(state).calls == [("headers", None), ("error", None), ("done", None)]


@pytest.mark.parametrize(("ref", "tries"), [("fc:retrying/down", 3), ("fc:mock/down", 1)])
async def test_retries_are_attempts_of_the_same_candidate(
    tmp_path: Path, ref: str, tries: int
) -> None:
    """`retries: 2` makes three attempts of one candidate, each through the attempt hooks,
    before the cascade gives up on it, whole and streamed (one retry loop for both)."""
    async with api_client(tmp_path, MOCK) as (client, state):
        for stream in (False, True):
            seen = recorder(state)
            seen.calls.clear()
            answer = await client.post(
                "/v1/chat/completions", json={"model": ref, "messages": HELLO, "stream": stream}
            )
            assert answer.status == 503, await answer.text()
            assert (await answer.json())["error"]["code"] == "upstream_unavailable"
            attempts = [call for call in seen.calls if call[0] == "attempt"]
            assert attempts == [("attempt", ref)] * tries, stream
            flow = seen.flows[-1]
            assert len(flow.attempts) == tries
            assert all(attempt.error is not None for attempt in flow.attempts)


async def test_hooks_run_on_a_flow_built_in_the_test(tmp_path: Path) -> None:
    """make_flow: the built-in chain on a Flow without HTTP (open mode: anyone on loopback)."""
    async with api_client(tmp_path, MOCK) as (_client, state):
        runtime = state.runtime
        flow = make_flow({"model": "fc:mock/echo", "messages": HELLO}, {"FC-Customer": "acme"})
        await runtime.pipeline.run("headers", flow)
        assert flow.response is None
        assert flow.principal.customer == "acme"
        estimate = Estimate(prompt_tokens=10, max_output=None)
        route = runtime.router.resolve("slot:chat", estimate, runtime.services.circuits.is_open)
        assert [candidate.ref for candidate in route.candidates] == [
            "fc:mock/down", "fc:mock/echo",
        ]  # fmt: skip
        assert recorder(state).calls == [("headers", None)]
