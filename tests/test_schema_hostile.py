"""Hostile `response_format` schemas through a real sidecar (issue 16): each is answered within
its bounds with the error that says why, a client that goes away stops its request's work, and
other requests are served meanwhile."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from tests.conftest import openai_config
from tests.procs import SidecarProcess
from tests.support import CHAT, request, without_circuit_breakers
from tests.upstreams.openai_fake import FakeOpenAI, Reply

pytestmark = pytest.mark.timeout(90)

ASK = [{"role": "user", "content": "Answer in JSON."}]
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}
PARIS = '{"city": "Paris", "country": "France"}'
# 20k objects, the last a duplicate (0.2 MB: the fake upstream takes re-prompts of up to 1 MiB).
# The engine before this change compared them pairwise: minutes per answer.
UNIQUE_ANSWER = orjson.dumps([{"i": i} for i in range(20_000)] + [{"i": 7}]).decode()
REDOS_ANSWER = json.dumps(["a" * 60 + "!"] * 100)


def ask(model: str, schema: Any) -> dict[str, Any]:
    return {
        "model": f"fc:openai/{model}",
        "messages": ASK,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }


HOSTILE: dict[str, dict[str, Any]] = {
    "unique-items-20k": ask("gpt-4o", {"type": "array", "uniqueItems": True}),
    "redos-100-strings": ask(
        "redos-model", {"type": "array", "items": {"type": "string", "pattern": "^(a|aa)+$"}}
    ),
    "2000-patterns": ask(
        "gpt-4o-mini",
        {
            "type": "object",
            "properties": {f"p{i}": {"type": "string", "pattern": f"^x{i}$"} for i in range(2000)},
        },
    ),
    "15k-properties": ask(
        "gpt-4o-mini",
        {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(15_000)}},
    ),
}
ORDINARY = ask("gpt-4o-mini", CITY_SCHEMA)


@pytest.fixture
def gateway(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> SidecarProcess:
    config = openai_config(fake_openai.url)
    config["models"]["fc:openai/redos-model"] = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
    fake_openai.on_model("gpt-4o", Reply(content=UNIQUE_ANSWER))
    fake_openai.on_model("redos-model", Reply(content=REDOS_ANSWER))
    fake_openai.on_model("gpt-4o-mini", Reply(content=PARIS))
    return sidecar_factory(without_circuit_breakers(config))


def post(proc: SidecarProcess, body: dict[str, Any] | bytes, timeout: float = 20) -> Any:
    return request(proc.url, "POST", CHAT, body, timeout=timeout)


@pytest.mark.parametrize(
    ("name", "status", "says", "within"),
    [
        # a slow machine may spend the budget on the first rounds: then the third is too costly
        ("unique-items-20k", 422, "the answer does not match the schema|too costly", 5.0),
        ("redos-100-strings", 422, 'does not match "^(a|aa)+$"', 3.0),
        ("2000-patterns", 400, "has over 32 patterns; at most 32", 3.0),
        ("15k-properties", 400, "the gateway takes schemas of at most 128 KiB", 3.0),
    ],
)
def test_a_hostile_schema_is_answered_within_bounds(
    gateway: SidecarProcess,
    fake_openai: FakeOpenAI,
    name: str,
    status: int,
    says: str,
    within: float,
) -> None:
    started = time.monotonic()
    answer = post(gateway, HOSTILE[name])
    assert time.monotonic() - started < within
    assert answer.status == status
    assert answer.error["param"] == "response_format"
    assert any(said in answer.error["message"] for said in says.split("|")), answer.error
    if status == 400:
        assert fake_openai.received == []


def test_ordinary_requests_are_served_while_hostile_ones_run(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    stop = threading.Event()
    answered: list[int] = []

    def hostile(body: bytes) -> None:  # serialized once: this process must not hog the GIL
        while not stop.is_set():
            try:
                answered.append(post(gateway, body, timeout=30).status)
            except OSError:
                answered.append(0)

    threads = [
        threading.Thread(target=hostile, args=(orjson.dumps(body),)) for body in HOSTILE.values()
    ]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 5
        while "gpt-4o" not in fake_openai.models_called() and time.monotonic() < deadline:
            time.sleep(0.01)  # until a 0.9 MB answer is on its way to be checked
        latencies = []
        for _ in range(40):
            started = time.monotonic()
            answer = post(gateway, ORDINARY, timeout=5)
            latencies.append(time.monotonic() - started)
            assert answer.status == 200
        assert "gpt-4o" in fake_openai.models_called()
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    p95 = sorted(latencies)[int(len(latencies) * 0.95) - 1]
    assert p95 < 0.2, f"p95 {p95 * 1000:.0f} ms: {sorted(latencies)[-5:]}"
    assert answered and set(answered) <= {400, 422}, answered


def test_a_client_that_goes_away_stops_its_requests_work(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model("gpt-4o", Reply(content=UNIQUE_ANSWER, delay=1.0))
    with pytest.raises(TimeoutError):  # it hangs up during the re-prompt's call
        post(gateway, HOSTILE["unique-items-20k"], timeout=1.6)
    gone = time.monotonic()
    answer = post(gateway, ORDINARY, timeout=5)
    assert answer.status == 200
    assert time.monotonic() - gone < 1
    time.sleep(2.5)  # what the request would have gone on with: more calls and checks
    hostile = [r for r in fake_openai.received if r.body["model"] == "gpt-4o"]
    assert len(hostile) == 2
    assert hostile[1].disconnected
