"""A fake Gemini `generateContent` server, for the Generative Language API and Vertex AI alike,
built from Google's public API reference and the official `google-genai` SDK's types.

Every request is checked as the real API would: the path (`/v1beta/models/{model}:
generateContent`, or on Vertex `/v1/projects/{project}/locations/{location}/publishers/google/
models/{model}:…`; `:streamGenerateContent` with `alt=sse`), the credential (`x-goog-api-key`,
or on Vertex `Authorization: Bearer` with a token the fake token endpoint issued), and the body
against the SDK's own types (`Content`, `Part`, `Tool`, `ToolConfig`, `GenerationConfig`, …, by
their camelCase REST names, unknown fields refused), plus the rules the API states that types
cannot carry (roles user/model, one data field per part, as many function responses as the
model turn made calls, allowedFunctionNames only with mode ANY, responseJsonSchema only with
responseMimeType application/json). What is wrong is recorded (`Received.problems`) and answered
as the API answers it (401/403 or 400 in Google's error envelope). Answers are built through
`GenerateContentResponse` and dumped by alias, so they cannot drift from what the API sends.

Replies are scripted: the queue given to `script(...)`, then the default (a short text answer).

Embeddings: `batchEmbedContents` on the Gemini API (the body checked against the SDK's
`Content` and the REST `EmbedContentRequest` fields, at most 100 requests, each naming the
path's model) and `:predict` on Vertex AI (instances of `content`, `task_type`, `title`, at most
250, one for gemini-* models; parameters `outputDimensionality`, `autoTruncate`), answered with
`google_vector(text, dimensions)` per text (not unit length) and, on Vertex, each text's
`statistics.token_count` (a token per 4 characters).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from google.genai import types as g
from google.genai._common import BaseModel as GenaiModel
from pydantic import ValidationError

from tests.upstreams.server import ThreadedServer


class GenerateContentRequest(GenaiModel):
    """The REST body of generateContent, field by field as the API reference lists it, each
    field the SDK's own type (the SDK's GenerateContentParameters is its Python-side shape)."""

    contents: list[g.Content]
    system_instruction: g.Content | None = None
    tools: list[g.Tool] | None = None
    tool_config: g.ToolConfig | None = None
    safety_settings: list[g.SafetySetting] | None = None
    cached_content: str | None = None
    generation_config: g.GenerationConfig | None = None
    labels: dict[str, str] | None = None  # Vertex AI only


# values that are free-form JSON (function arguments and results, schemas): not REST field names
_FREE_FORM = frozenset({"args", "response", "responseJsonSchema", "parametersJsonSchema", "labels"})
_PATH = re.compile(r"^/(?P<prefix>.+)/models/(?P<model>[^/:]+):(?P<method>[A-Za-z]+)$")
_DATA_FIELDS = ("text", "inlineData", "fileData", "functionCall", "functionResponse")


def _snake_keys(value: Any, at: str = "") -> list[str]:
    """Keys written in the SDK's snake_case: the REST API names fields in camelCase."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if "_" in key:
                found.append(f"{at}{key}: not a REST field name (camelCase)")
            if key not in _FREE_FORM:
                found += _snake_keys(item, f"{at}{key}.")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _snake_keys(item, f"{at}{index}.")
    return found


class EmbedContentRequest(GenaiModel):
    """One request of batchEmbedContents, as the REST reference lists its fields."""

    model: str
    content: g.Content
    task_type: str | None = None
    title: str | None = None
    output_dimensionality: int | None = None


class BatchEmbedContentsRequest(GenaiModel):
    requests: list[EmbedContentRequest]


TASK_TYPES = frozenset(
    {"RETRIEVAL_QUERY", "RETRIEVAL_DOCUMENT", "SEMANTIC_SIMILARITY", "CLASSIFICATION",
     "CLUSTERING", "QUESTION_ANSWERING", "FACT_VERIFICATION", "CODE_RETRIEVAL_QUERY"}
)  # fmt: skip
EMBED_METHODS = frozenset({"batchEmbedContents", "predict"})


def google_vector(text: str, dimensions: int) -> list[float]:
    """A stable vector per text, of no particular length (as shortened Gemini vectors are)."""
    seed = sum(text.encode()) % 79
    return [float((seed + 7 * i) % 10 - 3) / 8 for i in range(dimensions)]


def full_size(model: str) -> int:
    return 3072 if model.startswith("gemini") else 768


def batch_embed_problems(raw: bytes, model: str) -> list[str]:
    """Why batchEmbedContents would refuse this body for the path's `model`."""
    try:
        BatchEmbedContentsRequest.model_validate_json(raw)
    except ValidationError as exc:
        return [
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
            for error in exc.errors()[:5]
        ]
    body = orjson.loads(raw)
    problems = _snake_keys(body)
    requests = body["requests"]
    if not 1 <= len(requests) <= 100:
        problems.append("requests: at most 100 requests can be in one batch")
    for index, request in enumerate(requests):
        if request["model"] != f"models/{model}":
            problems.append(f"requests[{index}].model: {request['model']}, not models/{model}")
        parts = request["content"].get("parts") or []
        if len(parts) != 1 or set(parts[0]) != {"text"}:
            problems.append(f"requests[{index}].content: one text part")
        if request.get("taskType", "RETRIEVAL_QUERY") not in TASK_TYPES:
            problems.append(f"requests[{index}].taskType: {request['taskType']}")
    return problems


def predict_problems(raw: bytes, model: str) -> list[str]:
    """Why Vertex AI's :predict would refuse this text embedding body for `model`."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ["body is not JSON"]
    if not isinstance(body, dict):
        return ["body is not an object"]
    problems = [f"{key}: unknown field" for key in set(body) - {"instances", "parameters"}]
    instances = body.get("instances")
    most = 1 if model.startswith("gemini") else 250
    if not isinstance(instances, list) or not 1 <= len(instances) <= most:
        return [*problems, f"instances: 1 to {most} instances for {model}"]
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict) or not isinstance(instance.get("content"), str):
            problems.append(f"instances[{index}].content: a string is required")
            continue
        problems += [
            f"instances[{index}].{key}: unknown field"
            for key in set(instance) - {"content", "task_type", "title"}
        ]
        if instance.get("task_type", "RETRIEVAL_QUERY") not in TASK_TYPES:
            problems.append(f"instances[{index}].task_type: {instance['task_type']}")
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        return [*problems, "parameters: an object"]
    problems += [
        f"parameters.{key}: unknown field"
        for key in set(parameters) - {"outputDimensionality", "autoTruncate"}
    ]
    dimensionality = parameters.get("outputDimensionality", 1)
    if not isinstance(dimensionality, int) or not 1 <= dimensionality <= full_size(model):
        problems.append("parameters.outputDimensionality: out of range")
    return problems


def _embed_answer(body: dict[str, Any], model: str, vertex: bool) -> bytes:
    if not vertex:
        embeddings = [
            g.ContentEmbedding(
                values=google_vector(
                    request["content"]["parts"][0]["text"],
                    request.get("outputDimensionality") or full_size(model),
                )
            )
            for request in body["requests"]
        ]
        return (
            g.EmbedContentResponse(embeddings=embeddings)
            .model_dump_json(by_alias=True, exclude_none=True)
            .encode()
        )
    size = (body.get("parameters") or {}).get("outputDimensionality") or full_size(model)
    predictions = [
        {"embeddings": {
            "values": google_vector(instance["content"], size),
            "statistics": {"truncated": False, "token_count": -(-len(instance["content"]) // 4)},
        }}
        for instance in body["instances"]
    ]  # fmt: skip
    characters = sum(len(instance["content"]) for instance in body["instances"])
    return orjson.dumps(
        {"predictions": predictions, "metadata": {"billableCharacterCount": characters}}
    )


def request_problems(raw: bytes) -> list[str]:
    """Why the API would refuse this generateContent body ([] when it takes it)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ["body is not JSON"]
    if not isinstance(body, dict):
        return ["body is not an object"]
    try:
        GenerateContentRequest.model_validate_json(raw)
    except ValidationError as exc:
        return [
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
            for error in exc.errors()[:5]
        ]
    problems = _snake_keys(body)
    calls_made = 0
    for index, content in enumerate(body["contents"]):
        if content.get("role") not in ("user", "model"):
            problems.append(f"contents.{index}.role: {content.get('role')!r}, not user or model")
        parts = content.get("parts") or []
        if not parts:
            problems.append(f"contents.{index}: a content needs at least one part")
        for number, part in enumerate(parts):
            held = [name for name in _DATA_FIELDS if name in part]
            if len(held) != 1:
                problems.append(f"contents.{index}.parts.{number}: one data field, not {held}")
        responses = sum(1 for part in parts if "functionResponse" in part)
        if responses and responses != calls_made:
            problems.append(
                f"contents.{index}: {responses} function responses for {calls_made} function "
                "calls: the number of function response parts must equal the number of "
                "function call parts of the function call turn"
            )
        calls_made = sum(1 for part in parts if "functionCall" in part)
    calling = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
    if calling.get("allowedFunctionNames") and calling.get("mode") != "ANY":
        problems.append("toolConfig.functionCallingConfig: allowedFunctionNames needs mode ANY")
    config = body.get("generationConfig") or {}
    if "responseJsonSchema" in config and config.get("responseMimeType") != "application/json":
        problems.append("generationConfig.responseJsonSchema needs responseMimeType JSON")
    return problems


@dataclass
class Call:
    name: str
    args: dict[str, Any]
    id: str | None = None
    signature: bytes | None = None


@dataclass
class Reply:
    text: str = "Hello from the fake Gemini upstream."
    calls: list[Call] = field(default_factory=list)  # after the text (if any)
    finish_reason: str = "STOP"
    prompt_tokens: int = 11
    output_tokens: int = 7
    thoughts_tokens: int | None = None
    cached_tokens: int | None = None
    blocked: str | None = None  # promptFeedback.blockReason: no candidates
    status: int = 200
    error_status: str = "INTERNAL"
    error_message: str = "fake upstream error"
    error_reason: str | None = None  # an ErrorInfo detail's reason (API_KEY_INVALID)
    retry_delay: str | None = None  # a RetryInfo detail ("3s")
    headers: dict[str, str] = field(default_factory=dict)
    chunks: int = 3  # stream: text events
    error_after_chunks: int | None = None  # stream: an error event after N text events
    delay: float = 0.0


@dataclass
class Received:
    path: str
    query: dict[str, str]
    model: str
    method: str
    headers: dict[str, str]
    body: dict[str, Any]
    problems: list[str]


class FakeGemini:
    """The Gemini API (`api_key`), or Vertex AI (`vertex=(project, location)`, bearer tokens
    from `tokens`)."""

    def __init__(
        self,
        api_key: str | None = None,
        *,
        vertex: tuple[str, str] | None = None,
        tokens: set[str] | None = None,
    ) -> None:
        self.api_key = api_key
        self.vertex = vertex
        self.tokens = tokens if tokens is not None else set()
        self._lock = threading.Lock()
        self._queue: deque[Reply] = deque()
        self.received: list[Received] = []
        self.server = ThreadedServer(self._app)

    # -- control, from the test's thread ---------------------------------------------------
    @property
    def url(self) -> str:
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
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{path:.*}", self._handle)
        return app

    def _prefix(self) -> str:
        if self.vertex is None:
            return "v1beta"
        project, location = self.vertex
        return f"v1/projects/{project}/locations/{location}/publishers/google"

    def _credential_problem(self, request: web.Request) -> tuple[int, str, str] | None:
        if self.vertex is None:
            if request.headers.get("x-goog-api-key") != self.api_key:
                return 400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key."
            return None
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            return (
                401, "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token",
            )  # fmt: skip
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        problems: list[str] = []
        match = _PATH.match(request.path)
        if match is None or match["prefix"] != self._prefix():
            problems.append(f"path {request.path}: not /{self._prefix()}/models/{{model}}:…")
        method = match["method"] if match else ""
        if match is not None and method in EMBED_METHODS:
            return await self._embed(request, raw, match["model"], method)
        if method not in ("generateContent", "streamGenerateContent"):
            problems.append(f"method {method!r}")
        if method == "streamGenerateContent" and request.query.get("alt") != "sse":
            problems.append("streamGenerateContent without alt=sse")
        credential = self._credential_problem(request)
        if credential is not None:
            problems.append(f"credential: {credential[2]}")
        problems += request_problems(raw)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = {}
        record = Received(
            request.path, dict(request.query), match["model"] if match else "", method,
            dict(request.headers), body if isinstance(body, dict) else {}, problems,
        )  # fmt: skip
        with self._lock:
            self.received.append(record)
            reply = self._queue.popleft() if self._queue else Reply()
        if credential is not None:
            reason = "API_KEY_INVALID" if self.vertex is None else None
            return _error(credential[0], credential[1], credential[2], reason=reason)
        if problems:
            return _error(400, "INVALID_ARGUMENT", "; ".join(problems))
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.status != 200:
            return _error(
                reply.status, reply.error_status, reply.error_message, reply.headers,
                reply.error_reason, reply.retry_delay,
            )  # fmt: skip
        count = (record.body.get("generationConfig") or {}).get("candidateCount") or 1
        if method == "streamGenerateContent":
            return await self._stream(request, record, reply, count)
        answer = _response(record.model, reply, count, [reply.text], reply.calls, True)
        return web.Response(
            body=_dump(answer), content_type="application/json", headers=reply.headers
        )

    async def _embed(
        self, request: web.Request, raw: bytes, model: str, method: str
    ) -> web.Response:
        problems: list[str] = []
        prefix = _PATH.match(request.path)
        if prefix is None or prefix["prefix"] != self._prefix():
            problems.append(f"path {request.path}: not /{self._prefix()}/models/{{model}}:…")
        vertex = self.vertex is not None
        expected = "predict" if vertex else "batchEmbedContents"
        if method != expected:
            problems.append(f"method {method!r}: this API embeds with {expected}")
        credential = self._credential_problem(request)
        if credential is not None:
            problems.append(f"credential: {credential[2]}")
        problems += predict_problems(raw, model) if vertex else batch_embed_problems(raw, model)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = {}
        record = Received(
            request.path, dict(request.query), model, method, dict(request.headers),
            body if isinstance(body, dict) else {}, problems,
        )  # fmt: skip
        with self._lock:
            self.received.append(record)
            reply = self._queue.popleft() if self._queue else Reply()
        if credential is not None:
            reason = "API_KEY_INVALID" if self.vertex is None else None
            return _error(credential[0], credential[1], credential[2], reason=reason)
        if problems:
            return _error(400, "INVALID_ARGUMENT", "; ".join(problems))
        if reply.status != 200:
            return _error(
                reply.status, reply.error_status, reply.error_message, reply.headers,
                reply.error_reason, reply.retry_delay,
            )  # fmt: skip
        return web.Response(
            body=_embed_answer(record.body, model, vertex), content_type="application/json"
        )

    async def _stream(
        self, request: web.Request, record: Received, reply: Reply, count: int
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", **reply.headers}
        )
        await response.prepare(request)

        async def send(data: bytes) -> None:
            await response.write(b"data: " + data + b"\r\n\r\n")

        if reply.blocked:
            await send(_dump(_response(record.model, reply, count, [], [], True)))
            await response.write_eof()
            return response
        pieces = _pieces(reply.text, reply.chunks)
        events: list[tuple[list[str], list[Call]]] = [([piece], []) for piece in pieces]
        if reply.calls:
            events.append(([], reply.calls))
        if not events:
            events.append(([], []))
        produced = 0
        for number, (texts, calls) in enumerate(events):
            if reply.error_after_chunks == number:
                error = _envelope(500, "INTERNAL", "An internal error has occurred.")
                await send(orjson.dumps(error))
                await response.write_eof()
                return response
            last = number == len(events) - 1
            produced += len("".join(texts))
            partial = Reply(
                **{**reply.__dict__, "output_tokens": reply.output_tokens if last else produced}
            )
            await send(_dump(_response(record.model, partial, count, texts, calls, last)))
        await response.write_eof()
        return response


def _response(
    model: str, reply: Reply, count: int, texts: list[str], calls: list[Call], last: bool
) -> g.GenerateContentResponse:
    usage = g.GenerateContentResponseUsageMetadata(
        prompt_token_count=reply.prompt_tokens,
        candidates_token_count=reply.output_tokens,
        total_token_count=reply.prompt_tokens + reply.output_tokens + (reply.thoughts_tokens or 0),
        thoughts_token_count=reply.thoughts_tokens,
        cached_content_token_count=reply.cached_tokens,
    )
    if reply.blocked:
        return g.GenerateContentResponse(
            prompt_feedback=g.GenerateContentResponsePromptFeedback(
                block_reason=reply.blocked  # type: ignore[arg-type]
            ),
            usage_metadata=usage,
            model_version=model,
            response_id="resp-fake-blocked",
        )
    candidates = []
    for index in range(count):
        parts = [g.Part(text=t if index == 0 else f"{t} ({index})") for t in texts if t]
        parts += [
            g.Part(
                function_call=g.FunctionCall(name=c.name, args=c.args, id=c.id),
                thought_signature=c.signature,
            )
            for c in calls
        ]
        candidates.append(
            g.Candidate(
                content=g.Content(role="model", parts=parts),
                index=index,
                finish_reason=reply.finish_reason if last else None,  # type: ignore[arg-type]
            )
        )
    return g.GenerateContentResponse(
        candidates=candidates, usage_metadata=usage, model_version=model,
        response_id="resp-fake-0001",
    )  # fmt: skip


def _dump(response: g.GenerateContentResponse) -> bytes:
    return response.model_dump_json(by_alias=True, exclude_none=True).encode()


def _pieces(text: str, count: int) -> list[str]:
    size = max(1, -(-len(text) // max(1, count)))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _envelope(
    code: int, status: str, message: str, reason: str | None = None, delay: str | None = None
) -> dict[str, Any]:
    """google.rpc.Status as the REST APIs send it."""
    details: list[dict[str, Any]] = []
    if reason:
        details.append(
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
             "domain": "googleapis.com"}
        )  # fmt: skip
    if delay:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay})
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return {"error": error}


def _error(
    code: int,
    status: str,
    message: str,
    headers: dict[str, str] | None = None,
    reason: str | None = None,
    delay: str | None = None,
) -> web.Response:
    return web.Response(
        status=code,
        body=orjson.dumps(_envelope(code, status, message, reason, delay)),
        content_type="application/json",
        headers=headers or {},
    )
