"""Large bodies are parsed and checked in slices: other requests are served meanwhile (issue 16).

A fresh 470 KB `response_format` schema of 15,000 properties cost ~7 ms of the event loop in one
block (orjson's parse, the depth check, the schema's size, freeing it), which every other
request of the process waited out: the soak's normal traffic went from 1.4 to 11.7 ms at p99.
Measured here as the longest step the loop runs while such bodies are posted: a ticker task
wakes at every turn of the loop and records the thread's CPU time between two wake-ups (CPU
time, so that another process taking the core does not count as a step).
"""

from __future__ import annotations

import asyncio
import gc
import io
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from sidecar.api.big_body import SLICED_FROM_BYTES, parse_large_json_object
from sidecar.api.common import parse_json_object
from sidecar.errors import GatewayError
from tests.inprocess import api_client, mock_config

CONFIG = mock_config("in process")
HELLO = [{"role": "user", "content": "hi"}]
JSON = {"Content-Type": "application/json"}
# a turn of the loop: measured 0.6-1.8 ms here; before slicing, 4.9-5.4 ms (the 590 KB schema
# bodies), 21-22 ms (the 2 MB body) and 63 ms (the 2 MB tree) on the same machine
MAX_STEP_MS = 2.5


def schema_body(properties: int, serial: int) -> bytes:
    """The soak's hostile body: a fresh schema (never cached) of `properties` properties."""
    schema = {
        "type": "object",
        "properties": {f"p{serial:09d}_{i}": {"type": "string"} for i in range(properties)},
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}}
    return orjson.dumps(
        {"model": "fc:mock/echo", "messages": HELLO, "response_format": response_format}
    )


def with_extra(properties: int) -> bytes:
    """An ordinary request carrying a large parameter the gateway passes through untouched."""
    extra = {f"field_{i}": {"type": "string", "n": i} for i in range(properties)}
    return orjson.dumps({"model": "fc:mock/echo", "messages": HELLO, "x_extra": extra})


def long_conversation(messages: int) -> bytes:
    """An ordinary request, only large: many turns of a conversation."""
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "word " * 20}
        for i in range(messages)
    ]
    return orjson.dumps({"model": "fc:mock/echo", "messages": turns})


class Ticker:
    """The longest step of the loop while it runs: the CPU time between two of its turns."""

    def __init__(self) -> None:
        self.longest_ms = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.thread_time()
        while True:
            await asyncio.sleep(0)
            now = time.thread_time()
            self.longest_ms = max(self.longest_ms, (now - last) * 1e3)
            last = now

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.ensure_future(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Any]:
    async with api_client(tmp_path, CONFIG) as (test_client, _state):
        yield test_client


async def longest_step(
    client: Any,
    bodies: list[bytes],
    check: Callable[[int, Any], None],
    path: str = "/v1/chat/completions",
) -> float:
    """Post `bodies` one after the other; every answer to `check`; the longest step of the loop
    meanwhile (one at a time: with several at once a turn of the loop runs a step of each).
    The collector is off while measuring: its pauses are the process's, not the request path's
    (the sidecar freezes its startup heap, sidecar/serve.py)."""

    async def post(body: bytes) -> None:
        # from a file object: the test client writes it 64 KiB at a time, with its
        # Content-Length (as bytes, its one write of megabytes was a step of this loop too)
        async with client.post(
            path, data=io.BytesIO(body), headers={"Content-Type": "application/json"}
        ) as response:
            assert response.request_info.headers["Content-Length"] == str(len(body))
            check(response.status, await response.json())

    await post(bodies[0])  # warm: first-use imports and caches are not what is measured
    gc.collect()
    gc.disable()
    try:
        async with Ticker() as ticker:
            for body in bodies[1:]:
                await post(body)
    finally:
        gc.enable()
    return ticker.longest_ms


def refused_for_size(status: int, answer: Any) -> None:
    assert status == 400, answer
    assert answer["error"]["param"] == "response_format"
    assert "the gateway takes schemas of at most 128 KiB" in answer["error"]["message"]


def answered(status: int, answer: Any) -> None:
    assert status == 200, answer
    assert answer["choices"][0]["message"]["content"] == "in process"


async def test_the_soaks_schema_bodies_do_not_hold_the_loop(client: Any) -> None:
    bodies = [schema_body(15_000, serial) for serial in range(5)]
    assert len(bodies[0]) > SLICED_FROM_BYTES  # ~590 KB
    longest = await longest_step(client, bodies, refused_for_size)
    assert longest < MAX_STEP_MS, f"the loop was held {longest:.2f} ms in one step"


async def test_a_two_megabyte_body_is_answered_without_holding_the_loop(client: Any) -> None:
    bodies = [with_extra(50_000) for _ in range(3)]
    assert len(bodies[0]) > 2_000_000
    longest = await longest_step(client, bodies, answered)
    assert longest < MAX_STEP_MS, f"the loop was held {longest:.2f} ms in one step"


def binary_tree(depth: int) -> Any:
    return 1 if depth == 0 else [binary_tree(depth - 1), binary_tree(depth - 1)]


async def test_a_body_of_small_containers_only_does_not_hold_the_loop(client: Any) -> None:
    """No container in it is wide: the walks go a level at a time, so that what they take
    whole at the bottom is small (taken depth first, one subtree was half the body: 20 ms)."""
    raw = orjson.dumps({"model": "fc:mock/echo", "messages": HELLO, "x_tree": binary_tree(19)})
    assert len(raw) > 2_000_000
    longest = await longest_step(client, [raw, raw, raw], answered)
    assert longest < MAX_STEP_MS, f"the loop was held {longest:.2f} ms in one step"


@pytest.mark.parametrize("messages", [100, 4_000], ids=["small", "large"])
async def test_a_conversation_is_answered_the_same_small_or_large(
    client: Any, messages: int
) -> None:
    body = long_conversation(messages)
    assert (len(body) >= SLICED_FROM_BYTES) == (messages > 100)
    async with client.post(
        "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    ) as response:
        answer = await response.json()
    answered(response.status, answer)
    assert answer["usage"]["prompt_tokens"] > messages * 20  # the mock read every turn


class Keeper:
    """An addon that keeps each request's body, or a part of it, after the request (as a log
    or a cache might)."""

    part: str | None = None

    def __init__(self) -> None:
        self.kept: list[Any] = []

    def done(self, flow: Any) -> None:
        self.kept.append(flow.body if self.part is None else flow.body[self.part])


@pytest.mark.parametrize("part", [None, "x_extra", "messages"])
async def test_what_something_else_keeps_is_left_whole(
    tmp_path: Path, part: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Freeing in slices empties the body's containers: only those nothing else holds."""
    monkeypatch.setattr(Keeper, "part", part)
    raw = with_extra(20_000)
    async with api_client(tmp_path, {**CONFIG, "addons": [f"{__name__}:Keeper"]}) as (
        test_client,
        state,
    ):
        (keeper,) = [a for a in state.runtime.pipeline.addons if isinstance(a, Keeper)]
        async with test_client.post(
            "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
        ) as response:
            answered(response.status, await response.json())
        await asyncio.sleep(0.3 if part else 1.5)  # freed by then (or given up on, if held)
        (kept,) = keeper.kept
        expected = orjson.loads(raw)
        assert kept == (expected if part is None else expected[part])


async def pieces(raw: bytes, size: int) -> Any:
    """A body sent chunked, `size` bytes a chunk, the client pausing between them."""
    for start in range(0, len(raw), size):
        yield raw[start : start + size]
        await asyncio.sleep(0)


@pytest.mark.parametrize("messages", [100, 4_000], ids=["small", "large"])
async def test_a_body_sent_in_chunks_is_gathered_whole(client: Any, messages: int) -> None:
    """Chunked transfer, many reads: every byte in order, small body or large."""
    body = long_conversation(messages)
    async with client.post(
        "/v1/chat/completions",
        data=pieces(body, 7_001),
        headers={"Content-Type": "application/json"},
    ) as response:
        answer = await response.json()
    answered(response.status, answer)
    assert answer["usage"]["prompt_tokens"] > messages * 20


async def test_a_chunked_body_over_the_limit_is_413(tmp_path: Path) -> None:
    config = {**CONFIG, "limits": {"max_body_bytes": 100_000}}
    async with (
        api_client(tmp_path, config) as (test_client, _state),
        test_client.post(
            "/v1/chat/completions",
            data=pieces(long_conversation(4_000), 7_001),
            headers={"Content-Type": "application/json"},
        ) as response,
    ):
        answer = await response.json()
    assert response.status == 413, answer
    assert answer["error"]["code"] == "request_too_large"
    assert "100000-byte limit" in answer["error"]["message"]


def one_string(size: int) -> bytes:
    """A request whose size is one string: an image sent inline, base64."""
    url = "data:image/png;base64," + "QUJD" * (size // 4)
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
    return orjson.dumps({"model": "fc:mock/echo", "messages": [message]})


async def parse_cpu_seconds(raw: bytes) -> float:
    started = time.thread_time()
    body = await parse_large_json_object(raw)
    assert body == orjson.loads(raw)
    return time.thread_time() - started


async def test_a_long_string_is_parsed_in_linear_time() -> None:
    """yajl lexes a token that spans reads again from its start at every read: fed 2 KiB at a
    time, a 1.3 MB string cost 250 ms, 4 times that at twice the size. A read now goes on to
    the end of a string it would end inside."""
    small, large = one_string(1_000_000), one_string(4_000_000)
    await parse_cpu_seconds(small)  # warm
    small_cpu = min([await parse_cpu_seconds(small) for _ in range(3)])
    large_cpu = min([await parse_cpu_seconds(large) for _ in range(3)])
    started = time.thread_time()
    orjson.loads(large)
    one_call = time.thread_time() - started
    assert large_cpu < 8 * small_cpu, (small_cpu, large_cpu)  # quadratic: 16 times
    assert large_cpu < 30 * one_call + 0.005, (large_cpu, one_call)  # was ~500 times


def refused_with(text: str) -> Callable[[int, Any], None]:
    def check(status: int, answer: Any) -> None:
        assert status == 400, answer
        assert answer["error"]["code"] == "invalid_request"
        assert answer["error"]["message"] == text, answer

    return check


def many_values(head: bytes, tail: bytes) -> bytes:
    """A body of `head`, 200,000 empty lists (under the memory bound), then `tail`."""
    many = b', "x_many": [' + b"[]," * 200_000 + b"[]]"
    return with_extra(0)[:-1] + head + many + tail + b"}"


@pytest.mark.parametrize(
    ("head", "tail", "message"),
    [
        (b"", b"\x0b", "the request body is not valid JSON: a vertical tab or form feed"),
        (b', "x_id": 123456789012345678901234567890', b"", (
            "the request body is not valid JSON: parse error: integer overflow"
        )),
        (b"", b', "x_deep": ' + b"[" * 70 + b"]" * 70, (
            "the request body nests arrays and objects more than 64 levels deep: at most 64 "
            "are accepted"
        )),
    ],
    ids=["vertical tab", "integer past 64 bits", "too deep"],
)  # fmt: skip
async def test_a_refusal_of_many_values_is_not_read_again_in_one_step(
    client: Any, head: bytes, tail: bytes, message: str
) -> None:
    """What the sliced reading cannot decide was read again by orjson in one call, to answer as
    a small body is answered: ~40 ms for these 200,000 values, one step of the loop. Past
    ORJSON_DECIDES_MAX_VALUES the body is refused for what the sliced reading found (a vertical
    tab: before anything is built; a body parsed whole: freed in slices)."""
    raw = many_values(head, tail)
    longest = await longest_step(client, [raw, raw, raw], refused_with(message))
    assert longest < MAX_STEP_MS, f"the loop was held {longest:.2f} ms in one step"


async def test_a_large_body_of_few_values_is_still_read_as_orjson_reads_it(client: Any) -> None:
    """Under ORJSON_DECIDES_MAX_VALUES, orjson decides, as for a small body: an integer past 64
    bits is read as a float, a vertical tab refused with orjson's message and position."""
    few = orjson.dumps({"model": "fc:mock/echo", "messages": HELLO, "x_text": "x" * 70_000})
    raw = few[:-1] + b', "x_id": 123456789012345678901234567890}'
    assert len(raw) > SLICED_FROM_BYTES
    async with client.post("/v1/chat/completions", data=raw, headers=JSON) as response:
        answered(response.status, await response.json())
    raw = few[:-1] + b"\x0b}"
    async with client.post("/v1/chat/completions", data=raw, headers=JSON) as response:
        answer = await response.json()
    assert response.status == 400
    assert answer["error"]["message"] == parse_error_of(raw)


def parse_error_of(raw: bytes) -> str:
    try:
        parse_json_object(raw)
    except GatewayError as error:
        return error.message
    raise AssertionError("orjson took it")


def many_messages(count: int, last: dict[str, Any], **extra: Any) -> bytes:
    messages = [{"role": "user", "content": "x"} for _ in range(count - 1)] + [last]
    return orjson.dumps({"model": "fc:mock/echo", "messages": messages, **extra})


async def test_a_long_messages_array_is_checked_a_part_at_a_time(client: Any) -> None:
    """Each message's check is ~0.15-0.3 µs: 50,000 of them were one step of ~10-17 ms."""
    raw = many_messages(50_000, {"role": "robot", "content": "x"})
    message = (
        "messages[49999].role must be one of system, developer, user, assistant, tool; got 'robot'"
    )
    longest = await longest_step(client, [raw, raw, raw], refused_with(message))
    assert longest < MAX_STEP_MS, f"the loop was held {longest:.2f} ms in one step"


async def test_the_other_checks_of_a_large_body_still_run(client: Any) -> None:
    raw = many_messages(5_000, {"role": "user", "content": "x"}, temperature=5)
    assert len(raw) > SLICED_FROM_BYTES
    async with client.post("/v1/chat/completions", data=raw, headers=JSON) as response:
        answer = await response.json()
    assert response.status == 400, answer
    assert answer["error"]["param"] == "temperature"
    raw = many_messages(5_000, {"role": "user", "content": "x"})
    async with client.post("/v1/chat/completions", data=raw, headers=JSON) as response:
        answered(response.status, await response.json())


INPUT_RULE = (
    "input must be a non-empty string, an array of strings, an array of token ids, or an "
    "array of arrays of token ids (at most 2048 inputs)"
)


async def test_a_long_embeddings_input_is_checked_a_part_at_a_time(client: Any) -> None:
    """~0.1 µs a token id: 300,000 of them (OpenAI's most in one request) were one step of
    ~20-30 ms. Arrays of token-id arrays only: every other form has at most 2,048 items."""
    given = [list(range(150_000)), [*range(150_000), -1]]
    raw = orjson.dumps({"model": "fc:mock/echo", "input": given})
    refused = refused_with(INPUT_RULE)
    longest = await longest_step(client, [raw, raw, raw], refused, "/v1/embeddings")
    assert longest < MAX_STEP_MS, f"the loop was held {longest:.2f} ms in one step"


async def test_a_long_embeddings_input_well_formed_is_answered(client: Any) -> None:
    raw = orjson.dumps({"model": "fc:mock/echo", "input": [list(range(20_000))] * 2})
    async with client.post("/v1/embeddings", data=raw, headers=JSON) as response:
        answer = await response.json()
    assert response.status == 200, answer
    assert len(answer["data"]) == 2
