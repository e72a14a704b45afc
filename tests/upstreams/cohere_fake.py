"""A fake Cohere v2 Chat API (`POST /v2/chat`) and Embed API (`POST /v2/embed`), built from
Cohere's public API reference.

Every request is checked as the real API would: the path, `Authorization: Bearer <key>` (else
a 401 `invalid api token`), and the body against the official `cohere` SDK's own types: the
request type is made from the parameters of the SDK's `V2Client.chat` / `chat_stream` (their
`ChatMessageV2`, `ToolV2`, `ResponseFormatV2`, … types), with no field of any model left
unknown, plus the rules the types do not carry (v2's ranges of `p`, `k`, the penalties,
`tool_choice` REQUIRED / NONE with tools, no `response_format` beside tools, tool results
answering a tool call). What is wrong is recorded (`problems`) and answered with Cohere's
error body (`{"id", "message"}`, status 400), so a test sees both. Answers are built through
the SDK's response and stream event types (`V2ChatResponse`, `ContentDeltaV2ChatStreamResponse`,
…) and sent as Cohere sends them: a JSON body, or SSE events named by `event:`.

Replies are scripted: the queue given to `script(...)`, then the default (a short answer).
Embed requests are checked against the parameters of the SDK's `V2Client.embed` (at most 96
texts, `output_dimension` one of 256, 512, 1024, 1536) and answered with an
`EmbedByTypeResponse`: a stable vector per text (`embed_vector`), billed tokens a token per 4
characters of each text, or the scripted `EmbedReply`.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import typing
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import cohere.types as co
import cohere.v2.types as co2
import orjson
from aiohttp import web
from cohere.v2.client import V2Client
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from tests.upstreams.server import ThreadedServer

RANGES = {
    "p": (0.01, 0.99),
    "k": (0, 500),
    "frequency_penalty": (0, 1),
    "presence_penalty": (0, 1),
    "temperature": (0, float("inf")),
}


def _request_type(method: Any, stream: bool | None) -> type[BaseModel]:
    """The body the SDK's `method` sends, as a pydantic model refusing unknown fields."""
    hints = typing.get_type_hints(method)
    fields: dict[str, Any] = {}
    for name, parameter in inspect.signature(method).parameters.items():
        if name in ("self", "request_options"):
            continue
        required = parameter.default is inspect.Parameter.empty
        fields[name] = (hints[name], ... if required else None)
    if stream is not None:
        fields["stream"] = (Literal[True] if stream else Literal[False], ...)
    config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    return create_model(f"ChatRequest{'Stream' if stream else ''}", __config__=config, **fields)


REQUESTS = {
    False: _request_type(V2Client.chat, stream=False),
    True: _request_type(V2Client.chat_stream, stream=True),
}
EMBED_REQUEST = _request_type(V2Client.embed, stream=None)
EMBED_BATCH = 96  # texts per call
OUTPUT_DIMENSIONS = (256, 512, 1024, 1536)  # Embed v4's


def embed_vector(text: str, dimensions: int = 8) -> list[float]:
    """A stable float32-exact vector per text (what a test can compare after base64)."""
    seed = sum(text.encode()) % 89
    return [float((seed + 3 * i) % 11 - 5) / 4 for i in range(dimensions)]


def embed_problems(body: dict[str, Any]) -> list[str]:
    """Why the v2 Embed API would refuse `body` ([] when it is valid)."""
    try:
        request = EMBED_REQUEST.model_validate(body)
    except ValidationError as exc:
        return [
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        ]
    problems = _unknown_fields(request)
    texts = body.get("texts") or []
    if not texts or len(texts) > EMBED_BATCH:
        problems.append(f"texts: between 1 and {EMBED_BATCH} texts")
    dimension = body.get("output_dimension")
    if dimension is not None and dimension not in OUTPUT_DIMENSIONS:
        problems.append(f"output_dimension: one of {OUTPUT_DIMENSIONS}")
    return problems


def _unknown_fields(value: Any, where: str = "") -> list[str]:
    """Fields the SDK's (extra-allowing) models did not know, anywhere in a validated body."""
    found: list[str] = []
    if isinstance(value, BaseModel):
        for name in value.model_extra or {}:
            found.append(f"{where}.{name}: unknown field".lstrip("."))
        for name in type(value).model_fields:
            found += _unknown_fields(getattr(value, name), f"{where}.{name}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found += _unknown_fields(item, f"{where}[{index}]")
    return found


def request_problems(body: dict[str, Any]) -> list[str]:
    """Why the v2 Chat API would refuse `body` ([] when it is valid)."""
    try:
        request = REQUESTS[body.get("stream") is True].model_validate(body)
    except ValidationError as exc:
        return [
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        ]
    problems = _unknown_fields(request)
    for name, (low, high) in RANGES.items():
        value = body.get(name)
        if value is not None and not low <= value <= high:
            problems.append(f"{name}: must be between {low} and {high}")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("REQUIRED", "NONE"):
        problems.append(f"tool_choice: {choice!r} is not one of REQUIRED, NONE")
    if choice is not None and not body.get("tools"):
        problems.append("tool_choice: needs tools")
    if body.get("response_format") is not None and body.get("tools"):
        problems.append("response_format: not supported in combination with tools")
    schema = (body.get("response_format") or {}).get("json_schema")
    if schema is not None and schema.get("type") != "object":
        problems.append("response_format.json_schema: the top level must be an object")
    called: set[str] = set()
    for index, message in enumerate(body.get("messages") or ()):
        for call in message.get("tool_calls") or ():
            called.add(call["id"])
        if message.get("role") == "tool" and message.get("tool_call_id") not in called:
            problems.append(f"messages[{index}].tool_call_id: answers no earlier tool call")
    return problems


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as v2 sends it


@dataclass
class Reply:
    content: str = "Hello from the fake Cohere."
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_plan: str | None = None  # v2 writes one before its tool calls
    thinking: str | None = None  # a thinking item before the text
    finish_reason: str | None = None  # default: COMPLETE, or TOOL_CALL with tool calls
    error: str | None = None  # message-end's `error` (finish_reason ERROR)
    input_tokens: int = 12  # usage.tokens (with Cohere's own template tokens)
    output_tokens: int = 7
    billed_input: int | None = 9  # usage.billed_units; None: no billed_units at all
    billed_output: int | None = 7
    chunks: int = 3
    status: int = 200
    message: str = "fake Cohere error"  # of a non-200 answer
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class EmbedReply:
    vectors: list[list[float]] | None = None  # default: embed_vector of each text
    billed_input: int | None = None  # default: a token per 4 characters; -1: no meta at all
    status: int = 200
    message: str = "fake Cohere error"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before the reply (a batch that fails after the others)
    for_text: str | None = None  # only for a call whose texts hold this one (else it waits)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    problems: list[str]


class FakeCohere:
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self._lock = threading.Lock()
        self._queue: deque[Reply] = deque()
        self._embed_queue: deque[EmbedReply] = deque()
        self.received: list[Received] = []
        self.server = ThreadedServer(self._app)

    # -- control, from the test's thread -------------------------------------------------------
    @property
    def url(self) -> str:
        """What the cohere SDK calls its base URL (`https://api.cohere.com`)."""
        return self.server.url

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self._embed_queue.clear()
            self.received.clear()

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._queue.extend(replies)

    def script_embed(self, *replies: EmbedReply) -> None:
        with self._lock:
            self._embed_queue.extend(replies)

    @property
    def problems(self) -> list[str]:
        with self._lock:
            return [problem for seen in self.received for problem in seen.problems]

    # -- the server ----------------------------------------------------------------------------
    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v2/chat", self._chat)
        app.router.add_post("/v2/embed", self._embed)
        return app

    async def _embed(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return _error(400, "invalid json syntax: the body is not a JSON object")
        problems = embed_problems(body)
        with self._lock:
            self.received.append(Received(request.path, dict(request.headers), body, problems))
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "invalid api token")
        if problems:
            return _error(400, "invalid request: " + "; ".join(problems))
        with self._lock:
            reply = next(
                (r for r in self._embed_queue if r.for_text is None or r.for_text in body["texts"]),
                None,
            )
            if reply is None:
                reply = EmbedReply()
            else:
                self._embed_queue.remove(reply)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.status != 200:
            return _error(reply.status, reply.message, reply.headers)
        texts = body["texts"]
        dimensions = body.get("output_dimension") or 8
        vectors = reply.vectors or [embed_vector(text, dimensions) for text in texts]
        billed = reply.billed_input
        if billed is None:
            billed = sum(-(-len(text) // 4) for text in texts)
        meta = None
        if billed >= 0:
            meta = co.ApiMeta(billed_units=co.ApiMetaBilledUnits(input_tokens=billed))
        answer = co.EmbedByTypeResponse(
            response_type="embeddings_by_type",
            id=str(uuid.uuid4()),
            embeddings=co.EmbedByTypeResponseEmbeddings(float_=vectors),
            texts=texts,
            meta=meta,
        )
        data = _wire(answer)
        assert data["embeddings"]["float"] == vectors  # the wire name, not the SDK's `float_`
        return web.json_response(data, headers=reply.headers)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return _error(400, "invalid json syntax: the body is not a JSON object")
        problems = request_problems(body)
        seen = Received(request.path, dict(request.headers), body, problems)
        with self._lock:
            self.received.append(seen)
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "invalid api token")
        if problems:
            return _error(400, "invalid request: " + "; ".join(problems))
        with self._lock:
            reply = self._queue.popleft() if self._queue else Reply()
        if reply.status != 200:
            return _error(reply.status, reply.message, reply.headers)
        if body["stream"]:
            return await self._stream(request, reply)
        return web.json_response(_wire(_response(reply)))

    async def _stream(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", **reply.headers}
        )
        await response.prepare(request)

        async def send(event: BaseModel) -> None:
            data = _wire(event)
            await response.write(
                b"event: " + data["type"].encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
            )
            await asyncio.sleep(0)

        role = co.ChatMessageStartEventDeltaMessage(role="assistant")
        await send(
            co2.MessageStartV2ChatStreamResponse(
                id=str(uuid.uuid4()), delta=co.ChatMessageStartEventDelta(message=role)
            )
        )
        index = 0
        if reply.thinking:
            await self._content(send, index, "thinking", [reply.thinking])
            index += 1
        if reply.tool_calls:
            for piece in _pieces(reply.tool_plan or "", reply.chunks):
                plan = co.ChatToolPlanDeltaEventDeltaMessage(tool_plan=piece)
                await send(
                    co2.ToolPlanDeltaV2ChatStreamResponse(
                        delta=co.ChatToolPlanDeltaEventDelta(message=plan)
                    )
                )
            for position, call in enumerate(reply.tool_calls):
                await self._tool_call(send, position, call, reply.chunks)
        elif reply.content:
            await self._content(send, index, "text", _pieces(reply.content, reply.chunks))
        end = co.ChatMessageEndEventDelta(
            finish_reason=_finish_reason(reply), error=reply.error, usage=_usage(reply)
        )
        await send(co2.MessageEndV2ChatStreamResponse(id=None, delta=end))
        await response.write_eof()
        return response

    async def _content(self, send: Any, index: int, kind: str, pieces: list[str]) -> None:
        start = co.ChatContentStartEventDeltaMessageContent(type=kind, **{kind: ""})
        await send(
            co2.ContentStartV2ChatStreamResponse(
                index=index,
                delta=co.ChatContentStartEventDelta(
                    message=co.ChatContentStartEventDeltaMessage(content=start)
                ),
            )
        )
        for piece in pieces:
            content = co.ChatContentDeltaEventDeltaMessageContent(**{kind: piece})
            await send(
                co2.ContentDeltaV2ChatStreamResponse(
                    index=index,
                    delta=co.ChatContentDeltaEventDelta(
                        message=co.ChatContentDeltaEventDeltaMessage(content=content)
                    ),
                )
            )
        await send(co2.ContentEndV2ChatStreamResponse(index=index))

    async def _tool_call(self, send: Any, index: int, call: ToolCall, chunks: int) -> None:
        opened = co.ToolCallV2(
            id=f"{call.name}_{uuid.uuid4().hex[:8]}",
            type="function",
            function=co.ToolCallV2Function(name=call.name, arguments=""),
        )
        await send(
            co2.ToolCallStartV2ChatStreamResponse(
                index=index,
                delta=co.ChatToolCallStartEventDelta(
                    message=co.ChatToolCallStartEventDeltaMessage(tool_calls=opened)
                ),
            )
        )
        for piece in _pieces(call.arguments, chunks):
            function = co.ChatToolCallDeltaEventDeltaMessageToolCallsFunction(arguments=piece)
            calls = co.ChatToolCallDeltaEventDeltaMessageToolCalls(function=function)
            await send(
                co2.ToolCallDeltaV2ChatStreamResponse(
                    index=index,
                    delta=co.ChatToolCallDeltaEventDelta(
                        message=co.ChatToolCallDeltaEventDeltaMessage(tool_calls=calls)
                    ),
                )
            )
        await send(co2.ToolCallEndV2ChatStreamResponse(index=index))


def _finish_reason(reply: Reply) -> str:
    if reply.finish_reason is not None:
        return reply.finish_reason
    if reply.error is not None:
        return "ERROR"
    return "TOOL_CALL" if reply.tool_calls else "COMPLETE"


def _usage(reply: Reply) -> co.Usage:
    tokens = co.UsageTokens(input_tokens=reply.input_tokens, output_tokens=reply.output_tokens)
    billed = None
    if reply.billed_input is not None:
        billed = co.UsageBilledUnits(
            input_tokens=reply.billed_input, output_tokens=reply.billed_output
        )
    return co.Usage(billed_units=billed, tokens=tokens)


def _response(reply: Reply) -> co2.V2ChatResponse:
    content: list[Any] = []
    if reply.thinking:
        content.append(co.ThinkingAssistantMessageResponseContentItem(thinking=reply.thinking))
    calls = None
    if reply.tool_calls:
        calls = [
            co.ToolCallV2(
                id=f"{call.name}_{uuid.uuid4().hex[:8]}",
                type="function",
                function=co.ToolCallV2Function(name=call.name, arguments=call.arguments),
            )
            for call in reply.tool_calls
        ]
    elif reply.content:
        content.append(co.TextAssistantMessageResponseContentItem(text=reply.content))
    message = co.AssistantMessageResponse(
        role="assistant", content=content or None, tool_calls=calls, tool_plan=reply.tool_plan
    )
    return co2.V2ChatResponse(
        id=str(uuid.uuid4()),
        finish_reason=_finish_reason(reply),
        message=message,
        usage=_usage(reply),
    )


def _wire(model: BaseModel) -> Any:
    """A model of the SDK's as JSON, without the fields it leaves unset (None)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items() if item is not None}
        if isinstance(value, list):
            return [strip(item) for item in value]
        return value

    return strip(model.model_dump(mode="json"))


def _pieces(text: str, count: int) -> list[str]:
    if not text:
        return []
    size = max(1, -(-len(text) // max(1, count)))
    return [text[start : start + size] for start in range(0, len(text), size)]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"id": str(uuid.uuid4()), "message": message}
    return web.json_response(body, status=status, headers=headers or {})
