"""A fake Anthropic Messages API server, built from Anthropic's public API reference.

Every request is checked as the real API would: the path `/v1/messages`, the `x-api-key` and
`anthropic-version` headers, and the body against the official SDK's own request type
(`anthropic.types.MessageCreateParams`, unknown fields refused). What is wrong is recorded on
the request (`Received.problems`) and answered as the API answers it (401 or 400 in its error
envelope), so a test sees both. Answers are built through the SDK's response and stream event
types (`Message`, `RawMessageStartEvent`, …), so they cannot drift from what the API sends.

Replies are scripted as in the OpenAI fake: the queue given to `script(...)`, then the default
(a short text answer).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic.types as wire
import orjson
from aiohttp import web
from anthropic.types.raw_message_delta_event import Delta
from anthropic.types.shared import ErrorResponse
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from tests.upstreams.server import ThreadedServer

API_VERSION = "2023-06-01"
REQUEST = TypeAdapter(wire.MessageCreateParams, config=ConfigDict(extra="forbid"))
SAMPLING = {"temperature": (0, 1), "top_p": (0, 1), "top_k": (0, 2**31)}


def request_problems(body: dict[str, Any]) -> list[str]:
    """Why the API would refuse `body`, per the SDK's request type ([] when it is valid).
    The type's iterables are validated lazily: every one is drained here.

    The SDK's types (1.0 on) no longer list the sampling parameters, which the API version
    2023-06-01 still takes on models that sample: they are checked here, by the API's rules."""
    problems = []
    sampling = {name: body.pop(name) for name in SAMPLING if name in body}
    for name, value in sampling.items():
        low, high = SAMPLING[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            problems.append(f"{name}: must be a number between {low} and {high}")
    if "temperature" in sampling and "top_p" in sampling:
        problems.append("temperature and top_p cannot both be specified for this model")
    try:
        _drain(REQUEST.validate_python(body))
    except ValidationError as exc:
        problems += [
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
            for error in exc.errors()[:5]
        ]
    finally:
        body.update(sampling)
    return problems


def _drain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _drain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | Iterator):
        return [_drain(item) for item in value]
    return value


@dataclass
class ToolUse:
    name: str
    input: dict[str, Any]
    id: str = ""


@dataclass
class Reply:
    text: str = "Hello from the fake Anthropic upstream."
    tool_uses: list[ToolUse] = field(default_factory=list)  # after the text (if any)
    stop_reason: str | None = None  # default: tool_use when there are tool uses, else end_turn
    input_tokens: int = 11
    output_tokens: int = 7
    cache_read: int | None = None
    cache_creation: int | None = None
    status: int = 200
    error_type: str = "api_error"
    error_message: str = "fake upstream error"
    headers: dict[str, str] = field(default_factory=dict)
    chunks: int = 3  # stream: text deltas (and argument deltas per tool use)
    error_after_chunks: int | None = None  # stream: an `error` event after N text deltas
    error_event_type: str = "overloaded_error"
    delay: float = 0.0


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    problems: list[str]


class FakeAnthropic:
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self._lock = threading.Lock()
        self._queue: deque[Reply] = deque()
        self.received: list[Received] = []
        self._ids = 0
        self.server = ThreadedServer(self._app)

    # -- control, from the test's thread ---------------------------------------------------
    @property
    def url(self) -> str:
        """What Anthropic's SDK calls the base URL: the API paths are appended to it."""
        return self.server.url

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self.received.clear()

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._queue.extend(replies)

    @property
    def last(self) -> Received:
        with self._lock:
            return self.received[-1]

    def problems(self) -> list[str]:
        with self._lock:
            return [problem for r in self.received for problem in r.problems]

    # -- the server ------------------------------------------------------------------------
    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        return app

    def _next_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}_fake{self._ids:04d}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        problems = []
        if request.path != "/v1/messages":
            problems.append(f"path {request.path}, not /v1/messages")
        if request.headers.get("x-api-key") != self.api_key:
            problems.append("x-api-key missing or wrong")
        if request.headers.get("anthropic-version") != API_VERSION:
            problems.append(f"anthropic-version is {request.headers.get('anthropic-version')!r}")
        problems += request_problems(body) if isinstance(body, dict) else ["body is not JSON"]
        record = Received(
            request.path, dict(request.headers), body if isinstance(body, dict) else {}, problems
        )
        with self._lock:
            self.received.append(record)
            reply = self._queue.popleft() if self._queue else Reply()
        if problems:
            status, kind = (
                (401, "authentication_error")
                if "x-api-key" in problems[0]
                else (400, "invalid_request_error")
            )
            return _error(status, kind, "; ".join(problems))
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.status != 200:
            return _error(reply.status, reply.error_type, reply.error_message, reply.headers)
        if record.body.get("stream"):
            return await self._stream(request, record.body, reply)
        return web.Response(
            body=self._message(record.body, reply).model_dump_json(exclude_unset=True),
            content_type="application/json",
            headers={"request-id": self._next_id("req"), **reply.headers},
        )

    def _usage(self, reply: Reply, output_tokens: int) -> wire.Usage:
        usage = wire.Usage(input_tokens=reply.input_tokens, output_tokens=output_tokens)
        if reply.cache_read is not None:
            usage.cache_read_input_tokens = reply.cache_read
        if reply.cache_creation is not None:
            usage.cache_creation_input_tokens = reply.cache_creation
        return usage

    def _tool_blocks(self, reply: Reply) -> list[wire.ToolUseBlock]:
        return [
            wire.ToolUseBlock(
                type="tool_use", id=use.id or self._next_id("toolu"), name=use.name,
                input=use.input,
            )
            for use in reply.tool_uses
        ]  # fmt: skip

    def _message(self, body: dict[str, Any], reply: Reply) -> wire.Message:
        content: list[Any] = []
        if reply.text:
            content.append(wire.TextBlock(type="text", text=reply.text))
        content += self._tool_blocks(reply)
        return wire.Message(
            id=self._next_id("msg"),
            type="message",
            role="assistant",
            model=body["model"],
            content=content,
            stop_reason=_stop_reason(reply),  # type: ignore[arg-type]
            stop_sequence=None,
            usage=self._usage(reply, reply.output_tokens),
        )

    async def _stream(
        self, request: web.Request, body: dict[str, Any], reply: Reply
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                     **reply.headers}
        )  # fmt: skip
        await response.prepare(request)

        async def send(event: BaseModel | dict[str, Any]) -> None:
            data = (
                event.model_dump_json(exclude_unset=True).encode()
                if isinstance(event, BaseModel)
                else orjson.dumps(event)
            )
            name = event.type if isinstance(event, BaseModel) else event["type"]  # type: ignore[attr-defined]
            await response.write(f"event: {name}\n".encode() + b"data: " + data + b"\n\n")

        start = self._message(body, reply)
        start.content, start.stop_reason = [], None
        start.usage = self._usage(reply, 1)
        await send(wire.RawMessageStartEvent(type="message_start", message=start))
        await send({"type": "ping"})
        index = 0
        if reply.text:
            await send(
                wire.RawContentBlockStartEvent(
                    type="content_block_start", index=0,
                    content_block=wire.TextBlock(type="text", text=""),
                )
            )  # fmt: skip
            for number, piece in enumerate(_pieces(reply.text, reply.chunks)):
                if reply.error_after_chunks == number:
                    await self._error_event(response, reply)
                    return response
                delta = wire.TextDelta(type="text_delta", text=piece)
                await send(
                    wire.RawContentBlockDeltaEvent(type="content_block_delta", index=0, delta=delta)
                )
            await send(wire.RawContentBlockStopEvent(type="content_block_stop", index=0))
            index = 1
        elif reply.error_after_chunks == 0:
            await self._error_event(response, reply)
            return response
        for block in self._tool_blocks(reply):
            opening = wire.ToolUseBlock(type="tool_use", id=block.id, name=block.name, input={})
            await send(
                wire.RawContentBlockStartEvent(
                    type="content_block_start", index=index, content_block=opening
                )
            )
            for piece in _pieces(orjson.dumps(block.input).decode(), reply.chunks):
                json_delta = wire.InputJSONDelta(type="input_json_delta", partial_json=piece)
                await send(
                    wire.RawContentBlockDeltaEvent(
                        type="content_block_delta", index=index, delta=json_delta
                    )
                )
            await send(wire.RawContentBlockStopEvent(type="content_block_stop", index=index))
            index += 1
        await send(
            wire.RawMessageDeltaEvent(
                type="message_delta",
                delta=Delta(stop_reason=_stop_reason(reply), stop_sequence=None),  # type: ignore[arg-type]
                usage=wire.MessageDeltaUsage(output_tokens=reply.output_tokens),
            )
        )
        await send(wire.RawMessageStopEvent(type="message_stop"))
        await response.write_eof()
        return response

    async def _error_event(self, response: web.StreamResponse, reply: Reply) -> None:
        error = ErrorResponse.model_validate(
            {"type": "error", "error": {"type": reply.error_event_type, "message": "Overloaded"}}
        )
        data = error.model_dump_json(exclude_unset=True).encode()
        await response.write(b"event: error\ndata: " + data + b"\n\n")
        await response.write_eof()


def _stop_reason(reply: Reply) -> str:
    if reply.stop_reason is not None:
        return reply.stop_reason
    return "tool_use" if reply.tool_uses else "end_turn"


def _pieces(text: str, count: int) -> list[str]:
    size = max(1, -(-len(text) // max(1, count)))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _error(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    envelope = ErrorResponse.model_validate(
        {"type": "error", "error": {"type": kind, "message": message}}
    )
    return web.Response(
        status=status,
        body=envelope.model_dump_json(exclude_unset=True),
        content_type="application/json",
        headers={"request-id": f"req_fake{int(time.monotonic() * 1000)}", **(headers or {})},
    )
