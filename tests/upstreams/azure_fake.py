"""A fake Azure OpenAI resource, shaped after Azure's REST reference and documented examples.

It serves both URL forms of one resource endpoint:
  POST /openai/deployments/{deployment}/chat/completions?api-version=YYYY-MM-DD[-preview]
  POST /openai/v1/chat/completions            (the deployment in the body's `model`)
and checks every request the way Azure does, answering Azure's own error bodies: a missing or
wrong credential (`api-key`, or `Authorization: Bearer` with an accepted Entra ID token) is a
401, a deployment it does not have a 404 `DeploymentNotFound`, a deployment URL without an
api-version a 404. Every body it receives is validated against the official `openai` SDK's
request types (`CompletionCreateParams`), and what is wrong with a request is kept in
`problems` for the test to assert empty.

Answers carry Azure's extras: `prompt_filter_results`, per-choice `content_filter_results`,
a stream that opens with a prompt-filter-only event (`id: ""`, `object: ""`) and, on request,
asynchronous-filter annotation events. Replies are scripted as in `openai_fake`: the queue of
`script(...)`, else the default reply.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from openai.types.chat import completion_create_params
from pydantic import TypeAdapter, ValidationError

from tests.upstreams.server import ThreadedServer

DATED_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?")
UNDERLYING_MODEL = "gpt-4o-2024-11-20"  # what Azure names in `model`: the deployed model
SAFE = {"filtered": False, "severity": "safe"}
NOT_DETECTED = {"filtered": False, "detected": False}
_REQUEST_TYPES = {
    False: TypeAdapter(completion_create_params.CompletionCreateParamsNonStreaming),
    True: TypeAdapter(completion_create_params.CompletionCreateParamsStreaming),
}


def output_filter_results(filtered: str | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {
        "hate": SAFE, "self_harm": SAFE, "sexual": SAFE, "violence": SAFE,
        "protected_material_code": NOT_DETECTED, "protected_material_text": NOT_DETECTED,
    }  # fmt: skip
    if filtered:
        results[filtered] = {"filtered": True, "severity": "high"}
    return results


def prompt_filter_results() -> list[dict[str, Any]]:
    results = {"hate": SAFE, "self_harm": SAFE, "sexual": SAFE, "violence": SAFE,
               "jailbreak": NOT_DETECTED}  # fmt: skip
    return [{"prompt_index": 0, "content_filter_results": results}]


@dataclass
class AzureReply:
    content: str = "Hello from the fake Azure deployment."
    prompt_tokens: int = 13
    completion_tokens: int = 8
    finish_reason: str = "stop"
    filtered_category: str | None = None  # output filtered: finish_reason content_filter
    tool_calls: list[dict[str, Any]] | None = None
    chunks: int = 3
    async_filter_events: bool = False  # stream: Azure's content_filter_offsets events
    status: int = 200
    error: dict[str, Any] | None = None  # the `error` object of a non-200 answer
    headers: dict[str, str] = field(default_factory=dict)


def content_filter_error(category: str = "hate") -> AzureReply:
    """Azure's answer to a prompt its content filter refuses (400 content_filter)."""
    result = {name: SAFE for name in ("hate", "self_harm", "sexual", "violence")}
    result[category] = {"filtered": True, "severity": "medium"}
    return AzureReply(
        status=400,
        error={
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's "
            "content management policy. Please modify your prompt and retry.",
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": result,
            },
        },
    )


def rate_limited(retry_after_ms: int = 1500) -> AzureReply:
    """Azure's 429 (token rate limit of the deployment), with both of its retry headers."""
    return AzureReply(
        status=429,
        error={
            "code": "429",
            "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI API "
            "version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 "
            "pricing tier. Please retry after 2 seconds.",
        },
        headers={
            "retry-after": str(-(-retry_after_ms // 1000)),
            "retry-after-ms": str(retry_after_ms),
        },
    )


@dataclass
class Received:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]


def _consumed(value: Any) -> Any:
    """`value` with the lazy iterators pydantic leaves for `Iterable[...]` fields consumed,
    which is when their items are validated."""
    if isinstance(value, dict):
        return {key: _consumed(item) for key, item in value.items()}
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return value
    return [_consumed(item) for item in value]


class FakeAzure:
    def __init__(
        self, api_key: str, tokens: set[str] | None = None, deployments: set[str] | None = None
    ) -> None:
        self.api_key = api_key
        self.tokens = set(tokens or ())  # accepted Entra ID bearer tokens
        self.deployments = set(deployments or ())
        self._lock = threading.Lock()
        self._queue: deque[AzureReply] = deque()
        self.received: list[Received] = []
        self.problems: list[str] = []  # what the sidecar sent wrong, for tests to assert empty
        self.server = ThreadedServer(self._app)

    # -- control, from the test's thread -------------------------------------------------------
    @property
    def url(self) -> str:
        """The resource endpoint, as `https://{resource}.openai.azure.com` would be."""
        return self.server.url

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self.received.clear()
            self.problems.clear()

    def script(self, *replies: AzureReply) -> None:
        with self._lock:
            self._queue.extend(replies)

    def accept_token(self, token: str) -> None:
        with self._lock:
            self.tokens.add(token)

    # -- the server ----------------------------------------------------------------------------
    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._deployment)
        app.router.add_post("/openai/v1/chat/completions", self._v1)
        app.router.add_route("*", "/openai/{rest:.*}", self._other)
        return app

    async def _other(self, request: web.Request) -> web.Response:
        """Any other call under the resource's /openai paths (a pass-through: files, batches,
        stored responses): recorded and authorized as a chat call is, answered with an empty
        list that names the path."""
        size = len(await request.read())
        record = Received(request.path, dict(request.query), dict(request.headers), {"bytes": size})
        with self._lock:
            self.received.append(record)
        if not self._authorized(request):
            return _error(401, {"code": "401", "message": "Access denied"})
        listed = {"object": "list", "data": [], "has_more": False, "path": request.path}
        return web.json_response({**listed, "first_id": None, "last_id": None})

    async def _deployment(self, request: web.Request) -> web.StreamResponse:
        version = request.query.get("api-version")
        if not version or not DATED_VERSION.fullmatch(version):
            self._problem(f"deployment URL with api-version {version!r}")
            return _error(404, {"code": "404", "message": "Resource not found"})
        return await self._serve(request, request.match_info["deployment"])

    async def _v1(self, request: web.Request) -> web.StreamResponse:
        version = request.query.get("api-version")
        if version not in (None, "preview", "latest"):
            self._problem(f"v1 URL with api-version {version!r}")
            return _error(
                400,
                {"code": "BadRequest", "message": f"API version not supported: {version}"},
            )
        return await self._serve(request, None)

    async def _serve(self, request: web.Request, deployment: str | None) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            self._problem("a body that is not JSON")
            return _error(400, {"code": "BadRequest", "message": "invalid JSON"})
        record = Received(request.path, dict(request.query), dict(request.headers), body)
        with self._lock:
            self.received.append(record)
        if not self._authorized(request):
            return _error(
                401,
                {"code": "401", "message": "Access denied due to invalid subscription key or "
                                           "wrong API endpoint. Make sure to provide a valid "
                                           "key for an active subscription and use a correct "
                                           "regional API endpoint for your resource."},
            )  # fmt: skip
        self._check_body(body)
        if deployment is None:
            deployment = str(body.get("model", ""))
        if self.deployments and deployment not in self.deployments:
            return _error(
                404,
                {"code": "DeploymentNotFound", "message": "The API deployment for this "
                 "resource does not exist. If you created the deployment within the last 5 "
                 "minutes, please wait a moment and try again."},
            )  # fmt: skip
        with self._lock:
            reply = self._queue.popleft() if self._queue else AzureReply()
        if reply.status != 200:
            return _error(reply.status, reply.error or {"code": "500", "message": "failed"},
                          reply.headers)  # fmt: skip
        if body.get("stream"):
            return await self._stream(request, body, reply)
        return web.json_response(_completion(body, reply), headers=reply.headers)

    def _authorized(self, request: web.Request) -> bool:
        key = request.headers.get("api-key")
        bearer = request.headers.get("Authorization", "")
        if key is not None and bearer:
            self._problem("both api-key and Authorization sent")
        if key is not None:
            return key == self.api_key
        token = bearer.removeprefix("Bearer ")
        with self._lock:
            return bearer.startswith("Bearer ") and token in self.tokens

    def _check_body(self, body: dict[str, Any]) -> None:
        stream = body.get("stream") is True
        try:
            _consumed(_REQUEST_TYPES[stream].validate_python(body))
        except ValidationError as exc:
            self._problem(f"a body the openai SDK's types refuse: {exc}")
        if stream and (body.get("stream_options") or {}).get("include_usage") is not True:
            self._problem("a stream without stream_options.include_usage")

    def _problem(self, what: str) -> None:
        with self._lock:
            self.problems.append(what)

    async def _stream(
        self, request: web.Request, body: dict[str, Any], reply: AzureReply
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", **reply.headers}
        )
        await response.prepare(request)

        async def send(data: dict[str, Any]) -> None:
            await response.write(b"data: " + orjson.dumps(data) + b"\n\n")
            await asyncio.sleep(0)

        # Azure's first event: the prompt's filter results, in a chunk of no chunk's shape
        await send({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                    "prompt_filter_results": prompt_filter_results()})  # fmt: skip
        base = {"created": int(time.time()), "id": "chatcmpl-azure-fake",
                "model": UNDERLYING_MODEL, "object": "chat.completion.chunk",
                "system_fingerprint": "fp_azure"}  # fmt: skip

        def choice(
            delta: dict[str, Any], finish: str | None = None, **extra: Any
        ) -> dict[str, Any]:
            return {"content_filter_results": extra.pop("filters", {}), "delta": delta,
                    "finish_reason": finish, "index": 0, "logprobs": None, **extra}  # fmt: skip

        await send({**base, "choices": [choice({"content": "", "refusal": None,
                                                "role": "assistant"})]})  # fmt: skip
        if reply.tool_calls is not None:
            calls = [{"index": i, **call} for i, call in enumerate(reply.tool_calls)]
            await send({**base, "choices": [choice({"tool_calls": calls})]})
        else:
            size = max(1, -(-len(reply.content) // reply.chunks))
            offset = 0
            for start in range(0, len(reply.content), size):
                piece = reply.content[start : start + size]
                await send({**base, "choices": [
                    choice({"content": piece}, filters=output_filter_results())]})  # fmt: skip
                if reply.async_filter_events:
                    offsets = {"check_offset": offset, "start_offset": offset,
                               "end_offset": offset + len(piece)}  # fmt: skip
                    await send({"choices": [{"content_filter_offsets": offsets,
                                             "content_filter_results": output_filter_results(),
                                             "finish_reason": None, "index": 0}],
                                "created": 0, "id": "", "model": "", "object": ""})  # fmt: skip
                offset += len(piece)
        finish = "content_filter" if reply.filtered_category else reply.finish_reason
        filters = output_filter_results(reply.filtered_category) if reply.filtered_category else {}
        await send({**base, "choices": [choice({}, finish, filters=filters)]})
        usage = _usage(reply)
        await send({**base, "choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _usage(reply: AzureReply) -> dict[str, Any]:
    return {
        "completion_tokens": reply.completion_tokens,
        "completion_tokens_details": {"accepted_prediction_tokens": 0, "audio_tokens": 0,
                                      "reasoning_tokens": 0, "rejected_prediction_tokens": 0},
        "prompt_tokens": reply.prompt_tokens,
        "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0},
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }  # fmt: skip


def _completion(body: dict[str, Any], reply: AzureReply) -> dict[str, Any]:
    message: dict[str, Any] = {"content": reply.content, "refusal": None, "role": "assistant"}
    finish = reply.finish_reason
    if reply.tool_calls is not None:
        message = {"content": None, "refusal": None, "role": "assistant",
                   "tool_calls": reply.tool_calls}  # fmt: skip
    if reply.filtered_category:  # the answer was cut by the output filter: no content
        message, finish = {"role": "assistant"}, "content_filter"
    return {
        "choices": [{
            "content_filter_results": output_filter_results(reply.filtered_category),
            "finish_reason": finish, "index": 0, "logprobs": None, "message": message,
        }],
        "created": int(time.time()),
        "id": "chatcmpl-azure-fake",
        "model": UNDERLYING_MODEL,
        "object": "chat.completion",
        "prompt_filter_results": prompt_filter_results(),
        "system_fingerprint": "fp_azure",
        "usage": _usage(reply),
    }  # fmt: skip


def _error(
    status: int, error: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": error}, status=status, headers=headers or {})
