"""A fake OpenAI Chat Completions server, built from the public API reference.

It records every request it receives and answers each one with a scripted `Reply`:
success, an SSE stream, any error status with OpenAI's error envelope, slowness,
a connection reset, or a raw body. Replies are picked, in order, from
  1. the queue given to `script(...)` (one reply per request), then
  2. the reply registered for the request's `model` with `on_model(...)`, then
  3. the default: a short successful answer.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from openai.types.embedding_create_params import EmbeddingCreateParams
from pydantic import TypeAdapter

from tests.upstreams import openai_responses_fake
from tests.upstreams.server import ThreadedServer

EMBEDDING_PARAMS = TypeAdapter(EmbeddingCreateParams)


@dataclass
class Reply:
    content: str = "Hello from the fake upstream."
    prompt_tokens: int = 11
    completion_tokens: int = 7
    status: int = 200
    error_code: str | None = None
    error_message: str = "fake upstream error"
    error_type: str = "server_error"
    delay: float = 0.0  # before the headers
    chunk_delay: float = 0.0  # between stream chunks
    chunks: int = 3
    reset: bool = False  # drop the connection without an answer
    reset_after_chunks: int | None = None  # stream: drop the connection after N content chunks
    error_after_chunks: int | None = None  # stream: send an error event after N content chunks
    raw_body: bytes | None = None  # answer exactly these bytes with `status`
    headers: dict[str, str] = field(default_factory=dict)
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str = "stop"
    # where a stream reports usage: "asked" (OpenAI: a last chunk without choices, only when
    # stream_options.include_usage asks), "final" (on the finishing chunk, asked or not: e.g.
    # mistral, together, fireworks), "x_groq" (groq: in the finishing chunk's x_groq), "none"
    stream_usage: str = "asked"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float
    disconnected: bool = False  # the sidecar closed the connection before the answer ended
    disconnected_at: float | None = None  # time.monotonic() when that was noticed


def fake_vector(text: str, dimensions: int) -> list[float]:
    """A stable float32-exact vector per input (what a test can compare after base64)."""
    seed = sum(text.encode()) % 97
    return [float((seed + i) % 13 - 6) / 8 for i in range(dimensions)]


def embeddings_answer(body: dict[str, Any], reply: Reply) -> dict[str, Any]:
    """OpenAI's embeddings answer (platform.openai.com/docs/api-reference/embeddings): a
    `list` of `embedding` objects, floats or base64 of little-endian float32 as asked."""
    EMBEDDING_PARAMS.validate_python(body)  # what the sidecar sent is an OpenAI request
    given = body["input"]
    if isinstance(given, str) or (given and isinstance(given[0], int)):
        given = [given]
    texts = [item if isinstance(item, str) else ",".join(map(str, item)) for item in given]
    dimensions = body.get("dimensions", 8)
    data = []
    for index, text in enumerate(texts):
        vector: Any = fake_vector(text, dimensions)
        if body.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return {
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens},
    }


class FakeOpenAI:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[Reply] = deque()
        self._by_model: dict[str, Reply] = {}
        self.received: list[Received] = []
        self.stored = openai_responses_fake.StoredResponses()
        self.server = ThreadedServer(self._app)

    # -- control, from the test's thread ---------------------------------------------------
    @property
    def url(self) -> str:
        return self.server.url + "/v1"

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self._by_model.clear()
            self.received.clear()

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._queue.extend(replies)

    def on_model(self, model: str, reply: Reply) -> None:
        with self._lock:
            self._by_model[model] = reply

    def models_called(self) -> list[str]:
        with self._lock:
            return [r.body.get("model", "") for r in self.received]

    # -- the server ----------------------------------------------------------------------------
    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/v1/embeddings", self._handle)
        app.router.add_post("/v1/responses", self._handle)
        app.router.add_route("*", "/v1/responses/{id}", self._stored)
        app.router.add_route("*", "/v1/responses/{id}/{action}", self._stored)
        return app

    async def _stored(self, request: web.Request) -> web.Response:
        """A stored response's routes (retrieve, delete, cancel, input items)."""
        body = await request.json() if request.can_read_body else {}
        record = Received(request.path, dict(request.headers), body, time.monotonic())
        with self._lock:
            self.received.append(record)
        response_id, action = request.match_info["id"], request.match_info.get("action", "")
        return self.stored.handle(request.method, response_id, action)

    def _pick(self, model: str) -> Reply:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            return self._by_model.get(model, Reply())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        record = Received(request.path, dict(request.headers), body, time.monotonic())
        with self._lock:
            self.received.append(record)
        reply = self._pick(str(body.get("model", "")))
        try:
            return await self._answer(request, body, reply)
        except (asyncio.CancelledError, ConnectionResetError):
            record.disconnected = True
            record.disconnected_at = time.monotonic()
            raise

    async def _answer(
        self, request: web.Request, body: dict[str, Any], reply: Reply
    ) -> web.StreamResponse:
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.reset:
            assert request.transport is not None
            request.transport.abort()
            raise ConnectionResetError("fake reset")
        if reply.raw_body is not None:
            return web.Response(
                status=reply.status, body=reply.raw_body, headers=reply.headers,
                content_type="application/json",
            )  # fmt: skip
        if reply.status != 200:
            envelope = {
                "error": {
                    "message": reply.error_message,
                    "type": reply.error_type,
                    "param": None,
                    "code": reply.error_code,
                }
            }
            return web.json_response(envelope, status=reply.status, headers=reply.headers)
        if request.path.endswith("/responses"):
            return await openai_responses_fake.answer(request, body, reply, self.stored)
        if request.path.endswith("/embeddings"):
            return web.json_response(embeddings_answer(body, reply), headers=reply.headers)
        if body.get("stream"):
            return await self._stream(request, body, reply)
        message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
        if reply.tool_calls is not None:
            message = {"role": "assistant", "content": None, "tool_calls": reply.tool_calls}
        return web.json_response(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": reply.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": reply.prompt_tokens,
                    "completion_tokens": reply.completion_tokens,
                    "total_tokens": reply.prompt_tokens + reply.completion_tokens,
                },
                "system_fingerprint": "fp_fake",
            },
            headers=reply.headers,
        )

    async def _stream(
        self, request: web.Request, body: dict[str, Any], reply: Reply
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", **reply.headers}
        )
        await response.prepare(request)
        options = body.get("stream_options") or {}
        include_usage = options.get("include_usage") is True
        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model"),
            "system_fingerprint": "fp_fake",
        }
        if include_usage:
            base["usage"] = None

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            await response.write(
                b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"
            )

        await send(
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        )
        size = max(1, -(-len(reply.content) // reply.chunks))
        # cut as sent: a long answer held back by a slow reader costs no copy of its length
        pieces: Iterable[str] = (
            reply.content[i : i + size] for i in range(0, len(reply.content), size)
        )
        if reply.tool_calls is not None:  # a tool-call ending streams the calls, no content
            pieces = ()
            calls = [{"index": i, **call} for i, call in enumerate(reply.tool_calls)]
            await send([{"index": 0, "delta": {"tool_calls": calls}, "finish_reason": None}])
        for index, piece in enumerate(pieces):
            if reply.reset_after_chunks is not None and index == reply.reset_after_chunks:
                assert request.transport is not None
                request.transport.abort()
                raise ConnectionResetError("fake reset mid-stream")
            if reply.error_after_chunks is not None and index == reply.error_after_chunks:
                error = {"error": {"message": "fake mid-stream failure", "type": "server_error",
                                   "param": None, "code": None}}  # fmt: skip
                await response.write(b"data: " + orjson.dumps(error) + b"\n\n")
                await response.write_eof()
                return response
            if reply.chunk_delay:
                await asyncio.sleep(reply.chunk_delay)
            await send([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        usage = {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        }
        finishing = [{"index": 0, "delta": {}, "finish_reason": reply.finish_reason}]
        if reply.stream_usage == "final":
            await send(finishing, usage=usage)
        elif reply.stream_usage == "x_groq":
            await send(finishing, x_groq={"id": "req_fake", "usage": usage})
        else:
            await send(finishing)
        if include_usage and reply.stream_usage == "asked":
            await response.write(
                b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n"
            )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
