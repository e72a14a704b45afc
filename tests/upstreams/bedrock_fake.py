"""A fake Amazon Bedrock runtime (Converse / ConverseStream), checking every request as AWS does.

  POST /model/{modelId}/converse          → a Converse JSON answer
  POST /model/{modelId}/converse-stream   → `application/vnd.amazon.eventstream` frames
  POST /model/{modelId}/invoke            → an embedding model's answer (Titan Text Embeddings
                                            v1 / v2, Cohere Embed), tokens in its headers

Every request's SigV4 signature is recomputed with botocore's `SigV4Auth` from the fake's own
credentials over the request as received (path, signed headers, body): a wrong signature is
answered as AWS does (403 `InvalidSignatureException`), an unknown access key with 403
`UnrecognizedClientException`, a missing or wrong session token, a scope of another region or
service, or a date more than 5 minutes off likewise. A Bedrock API key (`Authorization:
Bearer`) is taken instead of a signature when it is one of `api_keys`. Every body is validated
against botocore's `bedrock-runtime` service model (`ConverseRequest` / `ConverseStreamRequest`,
with the model id of the path) by botocore's `ParamValidator`, blobs base64-decoded on the way
as AWS's JSON protocol carries them; what is wrong is kept in `problems` for the test to assert
empty, and answered 400 `ValidationException`.

Stream frames are built by hand from the public format (prelude: total length, headers length,
prelude CRC32; headers `:event-type`, `:content-type`, `:message-type`; payload; message CRC32),
each checked to decode with botocore's `EventStreamBuffer`. Event payloads carry AWS's `p`
padding field. Replies are scripted: the queue of `script(...)`, else the default reply.
InvokeModel bodies, which the service model carries as an opaque blob, are checked against each
embedding family's documented body (`invoke_problems`: fields, values, Titan's one text,
Cohere's 96); the vectors are `invoke_vector(text, dimensions)`, the input tokens a token per 4
characters of each text (`X-Amzn-Bedrock-Input-Token-Count`, and Titan's `inputTextTokenCount`).
"""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import re
import threading
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from botocore.eventstream import EventStreamBuffer
from botocore.model import Shape
from botocore.session import get_session
from botocore.validate import ParamValidator

from tests.upstreams.server import ThreadedServer

SERVICE_MODEL = get_session().get_service_model("bedrock-runtime")
_PATH = re.compile(r"/model/(?P<model>[^/]+)/(?P<op>converse|converse-stream|invoke)")
_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, ?SignedHeaders=(?P<signed>[^,]+), ?"
    r"Signature=(?P<sig>[0-9a-f]+)"
)
MAX_SKEW = dt.timedelta(minutes=5)
SIGNATURE_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. Check "
    "your AWS Secret Access Key and signing method. Consult the service documentation for details."
)


@dataclass
class ToolUse:
    name: str
    input: dict[str, Any]
    tool_use_id: str = "tooluse_abc123"


@dataclass
class BedrockReply:
    text: str = "Hello from the fake Bedrock model."
    tool_uses: list[ToolUse] = field(default_factory=list)
    stop_reason: str = "end_turn"
    input_tokens: int = 11
    output_tokens: int = 7
    cache_read: int = 0
    cache_write: int = 0
    pieces: int = 3  # stream: the text in this many deltas, tool inputs in two
    status: int = 200
    error_type: str | None = None  # the x-amzn-ErrorType of a non-200 answer
    message: str = ""
    exception_after: str | None = None  # stream: this exception event after the first delta
    corrupt_crc: bool = False  # stream: the first delta's message CRC is wrong


def throttled() -> BedrockReply:
    return BedrockReply(
        status=429, error_type="ThrottlingException",
        message="Too many requests, please wait before trying again.",
    )  # fmt: skip


def too_long() -> BedrockReply:
    return BedrockReply(
        status=400, error_type="ValidationException",
        message="Input is too long for requested model.",
    )  # fmt: skip


def frame(event_type: str, payload: dict[str, Any], message_type: str = "event") -> bytes:
    """One event-stream message, built from the public format (see the module's docstring)."""
    kind = ":event-type" if message_type == "event" else ":exception-type"
    headers = b"".join(
        _header(name, value)
        for name, value in (
            (kind, event_type),
            (":content-type", "application/json"),
            (":message-type", message_type),
        )
    )
    body = orjson.dumps(payload)
    total = 12 + len(headers) + len(body) + 4
    prelude = total.to_bytes(4, "big") + len(headers).to_bytes(4, "big")
    message = prelude + zlib.crc32(prelude).to_bytes(4, "big") + headers + body
    data = message + zlib.crc32(message).to_bytes(4, "big")
    decoded = list(_decoder(data))  # what the real SDK's decoder reads of it
    assert len(decoded) == 1 and decoded[0].payload == body, decoded
    assert decoded[0].headers[kind] == event_type
    return data


def _decoder(data: bytes) -> EventStreamBuffer:
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    return buffer


def _header(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode(), value.encode()
    return (
        bytes([len(raw_name)]) + raw_name + b"\x07" + len(raw_value).to_bytes(2, "big") + raw_value
    )


def _padded(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "p": "abcdefghijklmnopqrstuvwxyz"[: 1 + len(payload) % 20]}


class FakeBedrock:
    def __init__(
        self,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        session_token: str | None = None,
        api_keys: frozenset[str] = frozenset(),
    ) -> None:
        self.credentials = {access_key: ReadOnlyCredentials(access_key, secret_key, session_token)}
        self.api_keys = api_keys  # Bedrock API keys, taken as `Authorization: Bearer`
        self.region = region
        self.problems: list[str] = []
        self.requests: list[dict[str, Any]] = []  # {model, op, body, headers}
        self._script: deque[BedrockReply] = deque()
        self._lock = threading.Lock()
        self.server = ThreadedServer(self._app)

    @property
    def url(self) -> str:
        return self.server.url

    def add_credentials(self, access_key: str, secret_key: str, token: str | None = None) -> None:
        self.credentials[access_key] = ReadOnlyCredentials(access_key, secret_key, token)

    def script(self, *replies: BedrockReply) -> None:
        with self._lock:
            self._script.extend(replies)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
        self.problems.clear()
        self.requests.clear()

    def _next(self) -> BedrockReply:
        with self._lock:
            return self._script.popleft() if self._script else BedrockReply()

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.raw_path
        matched = _PATH.fullmatch(raw_path)
        if matched is None:
            return _error(404, "UnknownOperationException", f"no operation at {raw_path}")
        body = await request.read()
        refusal = self._check_signature(request, raw_path, body)
        if refusal is not None:
            return refusal
        model_id = unquote(matched["model"])
        stream = matched["op"] == "converse-stream"
        try:
            params = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._invalid("the body is not JSON")
        self.requests.append(
            {"model": model_id, "op": matched["op"], "body": params,
             "headers": dict(request.headers)}
        )  # fmt: skip
        invoke = matched["op"] == "invoke"
        if invoke:
            problem = invoke_problems(params, model_id)
        else:
            problem = self._check_body(params, model_id, stream)
        if problem:
            return self._invalid(problem)
        reply = self._next()
        if reply.status != 200:
            return _error(
                reply.status, reply.error_type or "InternalServerException", reply.message
            )
        if invoke:
            answer, tokens = _invoke_answer(params, model_id)
            return web.json_response(
                answer, headers={"X-Amzn-Bedrock-Input-Token-Count": str(tokens),
                                 "x-amzn-RequestId": "fake-request-id"},
            )  # fmt: skip
        if stream:
            return await self._stream(request, reply)
        return web.json_response(_converse_answer(reply), dumps=lambda v: orjson.dumps(v).decode())

    def _invalid(self, problem: str) -> web.Response:
        self.problems.append(problem)
        return _error(400, "ValidationException", problem)

    def _check_signature(
        self, request: web.Request, raw_path: str, body: bytes
    ) -> web.Response | None:
        """None when the request is signed as AWS checks it, else AWS's 403."""
        authorization = request.headers.get("Authorization", "")
        if authorization.startswith("Bearer "):
            if authorization.removeprefix("Bearer ") in self.api_keys:
                return None
            return _error(403, "AccessDeniedException", "Invalid API Key format: Must start "
                          "with pre-defined prefix")  # fmt: skip
        parsed = _AUTH.fullmatch(authorization)
        if parsed is None:
            return _error(
                403, "MissingAuthenticationTokenException", "Missing Authentication Token"
            )
        credentials = self.credentials.get(parsed["key"])
        if credentials is None:
            return _error(
                403, "UnrecognizedClientException", "The security token included in the request "
                "is invalid.",
            )  # fmt: skip
        if request.headers.get("X-Amz-Security-Token") != credentials.token:
            return _error(
                403, "UnrecognizedClientException", "The security token included in the request "
                "is invalid.",
            )  # fmt: skip
        stamp = request.headers.get("X-Amz-Date", "")
        try:
            when = dt.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        except ValueError:
            return _error(403, "IncompleteSignatureException", "X-Amz-Date is missing or invalid")
        if abs(dt.datetime.now(dt.UTC) - when) > MAX_SKEW:
            return _error(403, "InvalidSignatureException", "Signature expired")
        scope_ok = (
            parsed["date"] == stamp[:8]
            and parsed["region"] == self.region
            and parsed["service"] == "bedrock"
        )
        signed = parsed["signed"].split(";")
        if not scope_ok or "host" not in signed or "x-amz-date" not in signed:
            return _error(403, "InvalidSignatureException", SIGNATURE_MISMATCH)
        headers = {name: request.headers.get(name, "") for name in signed}
        aws = AWSRequest(
            method=request.method, url=f"http://{request.host}{raw_path}", data=body,
            headers=headers,
        )  # fmt: skip
        aws.context["timestamp"] = stamp
        auth = SigV4Auth(credentials, "bedrock", self.region)
        expected = auth.signature(auth.string_to_sign(aws, auth.canonical_request(aws)), aws)
        if not hmac.compare_digest(expected, parsed["sig"]):
            return _error(403, "InvalidSignatureException", SIGNATURE_MISMATCH)
        return None

    def _check_body(self, params: Any, model_id: str, stream: bool) -> str | None:
        return converse_problems(params, model_id, stream)

    async def _stream(self, request: web.Request, reply: BedrockReply) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "application/vnd.amazon.eventstream",
                     "x-amzn-RequestId": "fake-request-id"}
        )  # fmt: skip
        await response.prepare(request)
        frames = [frame("messageStart", _padded({"role": "assistant"}))]
        index = 0
        if reply.text:
            size = max(1, -(-len(reply.text) // max(1, reply.pieces)))
            for start in range(0, len(reply.text), size):
                delta = {
                    "contentBlockIndex": 0,
                    "delta": {"text": reply.text[start : start + size]},
                }
                frames.append(frame("contentBlockDelta", _padded(delta)))
            frames.append(frame("contentBlockStop", _padded({"contentBlockIndex": 0})))
            index = 1
        for use in reply.tool_uses:
            start_event = {
                "contentBlockIndex": index,
                "start": {"toolUse": {"toolUseId": use.tool_use_id, "name": use.name}},
            }
            frames.append(frame("contentBlockStart", _padded(start_event)))
            arguments = orjson.dumps(use.input).decode()
            half = len(arguments) // 2
            for piece in (arguments[:half], arguments[half:]):
                delta = {"contentBlockIndex": index, "delta": {"toolUse": {"input": piece}}}
                frames.append(frame("contentBlockDelta", _padded(delta)))
            frames.append(frame("contentBlockStop", _padded({"contentBlockIndex": index})))
            index += 1
        frames.append(frame("messageStop", _padded({"stopReason": reply.stop_reason})))
        frames.append(
            frame("metadata", _padded({"usage": _usage(reply), "metrics": {"latencyMs": 42}}))
        )
        if reply.corrupt_crc:
            broken = bytearray(frames[1])
            broken[-1] ^= 0xFF
            frames[1] = bytes(broken)
        if reply.exception_after:
            exception = frame(
                reply.exception_after, {"message": reply.message or "the model failed"},
                message_type="exception",
            )  # fmt: skip
            frames = [*frames[:2], exception]
        for data in frames:
            await response.write(data)
        await response.write_eof()
        return response


def converse_problems(params: Any, model_id: str, stream: bool = False) -> str | None:
    """What botocore's validator finds wrong with a Converse (or ConverseStream) JSON body
    for `model_id`, None when nothing."""
    if not isinstance(params, dict):
        return "the body is not an object"
    operation = SERVICE_MODEL.operation_model("ConverseStream" if stream else "Converse")
    shape = operation.input_shape
    problems: list[str] = []
    converted = _from_json(params, shape, "", problems)
    converted["modelId"] = model_id
    report = ParamValidator().validate(converted, shape)
    if report.has_errors():
        problems.append(report.generate_report())
    return "; ".join(problems) or None


def _usage(reply: BedrockReply) -> dict[str, int]:
    usage = {
        "inputTokens": reply.input_tokens,
        "outputTokens": reply.output_tokens,
        "totalTokens": reply.input_tokens
        + reply.output_tokens
        + reply.cache_read
        + reply.cache_write,
    }
    if reply.cache_read:
        usage["cacheReadInputTokens"] = reply.cache_read
    if reply.cache_write:
        usage["cacheWriteInputTokens"] = reply.cache_write
    return usage


def _converse_answer(reply: BedrockReply) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"text": reply.text}] if reply.text else []
    content += [
        {"toolUse": {"toolUseId": use.tool_use_id, "name": use.name, "input": use.input}}
        for use in reply.tool_uses
    ]
    return {
        "output": {"message": {"role": "assistant", "content": content}},
        "stopReason": reply.stop_reason,
        "usage": _usage(reply),
        "metrics": {"latencyMs": 42},
    }


def _error(status: int, error_type: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"message": message}),
        headers={
            "Content-Type": "application/json",
            "x-amzn-ErrorType": f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/",
            "x-amzn-RequestId": "fake-request-id",
        },
    )


def _from_json(value: Any, shape: Shape, where: str, problems: list[str]) -> Any:
    """A JSON-protocol body as botocore's validator takes its input: blobs (base64 text on the
    wire) decoded to bytes; everything else as it is."""
    kind = shape.type_name
    if kind == "blob" and isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            problems.append(f"{where or 'body'}: not base64")
            return value
    if kind == "structure" and isinstance(value, dict) and not shape.is_document_type:
        members = shape.members  # type: ignore[attr-defined]
        return {
            key: _from_json(item, members[key], f"{where}.{key}", problems)
            if key in members
            else item
            for key, item in value.items()
        }
    if kind == "list" and isinstance(value, list):
        member = shape.member  # type: ignore[attr-defined]
        return [_from_json(item, member, f"{where}[{i}]", problems) for i, item in enumerate(value)]
    if kind == "map" and isinstance(value, dict):
        inner = shape.value  # type: ignore[attr-defined]
        return {
            key: _from_json(item, inner, f"{where}.{key}", problems) for key, item in value.items()
        }
    return value


# -- InvokeModel: the embedding families (their bodies as Bedrock's model pages document them) --
TITAN_V2 = {"inputText", "dimensions", "normalize", "embeddingTypes"}
COHERE_FIELDS = {"texts", "images", "input_type", "truncate", "embedding_types"}
COHERE_V4_FIELDS = COHERE_FIELDS | {"inputs", "output_dimension", "max_tokens"}
COHERE_INPUT_TYPES = {"search_document", "search_query", "classification", "clustering", "image"}
COHERE_TYPES = {"float", "int8", "uint8", "binary", "ubinary"}


def _family(model_id: str) -> str | None:
    if "amazon.titan-embed-text-v2" in model_id:
        return "titan-v2"
    if "amazon.titan-embed-text-v1" in model_id or "amazon.titan-embed-g1-text" in model_id:
        return "titan-v1"
    if "cohere.embed-v4" in model_id:
        return "cohere-v4"
    if "cohere.embed-" in model_id:
        return "cohere-v3"
    return None


def invoke_problems(params: Any, model_id: str) -> str | None:
    """What Bedrock would refuse in an InvokeModel body for an embedding model, None if nothing."""
    family = _family(model_id)
    if family is None:
        return f"the fake embeds with Titan Text Embeddings and Cohere Embed only, not {model_id}"
    if not isinstance(params, dict):
        return "the body is not an object"
    allowed = {
        "titan-v2": TITAN_V2, "titan-v1": {"inputText"},
        "cohere-v4": COHERE_V4_FIELDS, "cohere-v3": COHERE_FIELDS,
    }[family]  # fmt: skip
    extraneous = sorted(set(params) - allowed)
    if extraneous:
        return f"extraneous key [{extraneous[0]}] is not permitted"
    problems: list[str] = []
    if family.startswith("titan"):
        text = params.get("inputText")
        if not isinstance(text, str) or not text or len(text) > 50_000:
            problems.append("inputText: a string of 1 to 50000 characters is required")
        if params.get("dimensions", 1024) not in (256, 512, 1024):
            problems.append("dimensions: one of 256, 512, 1024")
        if not isinstance(params.get("normalize", True), bool):
            problems.append("normalize: a boolean")
        if not set(params.get("embeddingTypes", ["float"])) <= {"float", "binary"}:
            problems.append("embeddingTypes: float, binary")
        return "; ".join(problems) or None
    texts = params.get("texts")
    if not isinstance(texts, list) or not 1 <= len(texts) <= 96:
        problems.append("texts: 1 to 96 texts")
    elif not all(isinstance(text, str) and 0 < len(text) <= 2048 for text in texts):
        problems.append("texts: strings of 1 to 2048 characters")
    if params.get("input_type") not in COHERE_INPUT_TYPES:
        problems.append("input_type: required, one of " + ", ".join(sorted(COHERE_INPUT_TYPES)))
    if params.get("truncate", "END") not in ("NONE", "START", "END"):
        problems.append("truncate: NONE, START or END")
    if not set(params.get("embedding_types", ["float"])) <= COHERE_TYPES:
        problems.append("embedding_types: " + ", ".join(sorted(COHERE_TYPES)))
    if params.get("output_dimension", 256) not in (256, 512, 1024, 1536):
        problems.append("output_dimension: one of 256, 512, 1024, 1536")
    return "; ".join(problems) or None


def invoke_vector(text: str, dimensions: int) -> list[float]:
    """A stable float32-exact vector per text."""
    seed = sum(text.encode()) % 83
    return [float((seed + 5 * i) % 9 - 4) / 16 for i in range(dimensions)]


def _tokens(text: str) -> int:
    return -(-len(text) // 4)


def _invoke_answer(params: dict[str, Any], model_id: str) -> tuple[dict[str, Any], int]:
    family = _family(model_id)
    if family in ("titan-v1", "titan-v2"):
        text = params["inputText"]
        size = params.get("dimensions", 1024) if family == "titan-v2" else 1536
        tokens = _tokens(text)
        return {"embedding": invoke_vector(text, size), "inputTextTokenCount": tokens}, tokens
    texts = params["texts"]
    size = params.get("output_dimension", 1536 if family == "cohere-v4" else 1024)
    vectors = [invoke_vector(text, size) for text in texts]
    answer: dict[str, Any] = {"id": "fake-embed-id", "texts": texts}
    if "embedding_types" in params:
        answer |= {"embeddings": {"float": vectors}, "response_type": "embeddings_by_type"}
    else:
        answer |= {"embeddings": vectors, "response_type": "embeddings_floats"}
    return answer, sum(_tokens(text) for text in texts)
