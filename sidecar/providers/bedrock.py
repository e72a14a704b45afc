"""The `bedrock` kind: Amazon Bedrock's Converse / ConverseStream API, translated both ways;
embeddings through InvokeModel (`/model/{modelId}/invoke`) with each family's body (bedrock_embed).

`POST {base_url}/model/{modelId}/converse` (and `/converse-stream`), the model id (a model id,
an inference profile id or an ARN) URL-encoded into the path; `base_url` defaults to
`https://bedrock-runtime.{region}.amazonaws.com`. The region is the provider's `region`, else
`AWS_REGION` / `AWS_DEFAULT_REGION` as the AWS SDKs read them; a provider with none is refused
at load. The request side is `bedrock_request`, the answer side `bedrock_answer`, the binary
stream framing `bedrock_eventstream`. Requests leave here unsigned: `bedrock_auth` signs each
with SigV4 from the AWS credential chain (botocore, the `bedrock` extra). A provider with
`api_key_env` uses a Bedrock API key instead, sent as `Authorization: Bearer` (no signature).

Errors are AWS's: the type in the `x-amzn-ErrorType` header (or `__type` in the body), the text
in `message`. ThrottlingException (429), ModelNotReadyException, ServiceUnavailableException,
InternalServerException, ModelTimeoutException, ModelErrorException and any 5xx escalate, and so
do the rejections of our credentials (AccessDenied, UnrecognizedClient, InvalidSignature,
ExpiredToken: 403); a ValidationException saying the input is too long is a context-length
failure; any other 4xx is the request's fault, answered with its type and message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

import orjson

from sidecar.errors import Outcome, UpstreamError, classify_http_failure, looks_like_context_length
from sidecar.providers.anthropic_request import output_tool
from sidecar.providers.base import Completion, HttpRequest, KindCaps, StreamDecoder, UpstreamCall
from sidecar.providers.bedrock_answer import BedrockStreamDecoder, completion
from sidecar.providers.bedrock_embed import batch_size as embed_batch_size
from sidecar.providers.bedrock_embed import invoke_answer, invoke_body
from sidecar.providers.bedrock_eventstream import EventStreamParser
from sidecar.providers.bedrock_request import converse_body
from sidecar.providers.native_embeddings import BatchLimit
from sidecar.providers.openai_compat import retry_after_seconds
from sidecar.settings.model import ProviderSettings

SERVICE = "bedrock"  # the SigV4 signing name of bedrock-runtime
INSTALL_HINT = "pip install 'ringside[bedrock]'"
# json_schema natively through a forced tool; no JSON mode: json_object takes the instruction
# path; one choice per call; usage ends every stream (the `metadata` event); embeddings
# (Titan Text Embeddings and Cohere Embed through InvokeModel)
CAPS = KindCaps(
    tools=True, vision=True, json_schema=True, json_object=False, n=False, embeddings=True
)
# the exceptions that are the service's or the model's trouble, not the request's: escalate
ESCALATING = frozenset(
    {
        "ThrottlingException",
        "ModelNotReadyException",
        "ServiceUnavailableException",
        "InternalServerException",
        "ModelTimeoutException",
        "ModelErrorException",
        "ModelStreamErrorException",
    }
)
CREDENTIAL_ERRORS = frozenset(
    {
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "IncompleteSignatureException",
        "ExpiredTokenException",
        "MissingAuthenticationTokenException",
    }
)
# the HTTP status of each exception a stream can raise mid-way (the service model's)
STREAM_EXCEPTION_STATUS = MappingProxyType(
    {
        "internalServerException": 500,
        "modelStreamErrorException": 424,
        "validationException": 400,
        "throttlingException": 429,
        "serviceUnavailableException": 503,
    }
)
_CONTEXT_MARKERS = ("too many input tokens", "input token count", "exceeds the context")


def region_of(settings: ProviderSettings) -> str | None:
    """The provider's region: `region`, else the environment's as the AWS SDKs read it."""
    return (
        settings.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or None
    )


def signs_calls(settings: ProviderSettings) -> bool:
    """Whether the provider's calls are signed with AWS credentials (SigV4): unless it names
    a Bedrock API key (`api_key_env`, e.g. AWS_BEARER_TOKEN_BEDROCK)."""
    return not settings.api_key_env


def settings_problems(settings: ProviderSettings) -> list[tuple[str, str]]:
    """(key, message) for what the JSON Schema cannot check about a bedrock provider."""
    problems: list[tuple[str, str]] = []
    if region_of(settings) is None:
        problems.append(
            ("", "bedrock needs a region: set region (us-east-1, ...), or AWS_REGION in the "
                 "sidecar's environment")
        )  # fmt: skip
    try:
        import botocore.auth  # noqa: F401
    except ImportError:
        problems.append(
            ("", f"the bedrock kind needs AWS's botocore, which is not installed: {INSTALL_HINT}")
        )
    return problems


class BedrockAdapter:
    """Built once per configured `bedrock` provider."""

    stream_parser = EventStreamParser  # ConverseStream is event-stream framed, not SSE

    def __init__(self, settings: ProviderSettings) -> None:
        self.name = settings.name
        self.caps = CAPS
        self.native_json_schema = (
            CAPS.json_schema if settings.native_json_schema is None else settings.native_json_schema
        )
        self.json_mode = CAPS.json_object
        self.region = region_of(settings) or "us-east-1"  # none is refused at load
        base = settings.base_url or f"https://bedrock-runtime.{self.region}.amazonaws.com"
        self.base = base.rstrip("/") + "/model/"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if settings.api_key:  # a Bedrock API key: no SigV4 signature then (see signs_calls)
            headers["Authorization"] = f"Bearer {settings.api_key}"
        headers.update(settings.headers)
        self.headers = headers
        self.stream_headers = {**headers, "Accept": "application/vnd.amazon.eventstream"}

    def url(self, model_id: str, stream: bool) -> str:
        path = "/converse-stream" if stream else "/converse"
        return self.base + quote(model_id, safe="") + path

    def build_request(self, call: UpstreamCall) -> HttpRequest:
        body = converse_body(call.body, self.name)
        headers = self.stream_headers if call.stream else self.headers
        if call.headers:
            headers = {**headers, **call.headers}
        return HttpRequest(self.url(call.model_id, call.stream), headers, orjson.dumps(body))

    def parse_response(self, body: bytes, call: UpstreamCall) -> Completion:
        return completion(body, call.model_id, output_tool(call.body))

    def embeddings_batch(self, model_id: str) -> BatchLimit:
        return embed_batch_size(model_id)

    def build_embeddings_request(self, call: UpstreamCall) -> HttpRequest:
        body = invoke_body(call.body, call.model_id, self.name)
        headers = {**self.headers, **call.headers} if call.headers else self.headers
        url = self.base + quote(call.model_id, safe="") + "/invoke"
        return HttpRequest(url, headers, orjson.dumps(body))

    def parse_embeddings_response(
        self, body: bytes, call: UpstreamCall, headers: Mapping[str, str]
    ) -> Completion:
        return invoke_answer(body, call.body, call.model_id, headers)

    def classify_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
        error_type, message = aws_error(body, headers)
        return failure(status, error_type, message, retry_after_seconds(headers))

    def stream_decoder(self, call: UpstreamCall) -> StreamDecoder:
        options = call.body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        return BedrockStreamDecoder(
            wants_usage, call.keep_content, output_tool(call.body), call.model_id, stream_failure
        )


def aws_error(body: bytes, headers: Mapping[str, str]) -> tuple[str | None, str]:
    """(exception name, message) of an AWS JSON error answer, tolerating anything."""
    header = next((v for k, v in headers.items() if k.lower() == "x-amzn-errortype"), None)
    error_type = header.split(":", 1)[0].strip() if header else None
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    message = ""
    if isinstance(data, dict):
        found = data.get("message") or data.get("Message")
        message = found if isinstance(found, str) else ""
        named = data.get("__type")
        if not error_type and isinstance(named, str) and named:
            error_type = named.rsplit("#", 1)[-1].split(":", 1)[0]
    elif body:
        message = body[:300].decode("utf-8", "replace").strip()
    return error_type or None, message or "no error message"


def failure(
    status: int, error_type: str | None, message: str, retry_after: float | None = None
) -> UpstreamError:
    """One Bedrock failure as an UpstreamError (see the module's docstring)."""
    text = f"{error_type}: {message}" if error_type else message
    if error_type in ESCALATING and status < 500 and status not in (408, 429):
        return UpstreamError(
            Outcome.UNAVAILABLE,
            f"upstream answered {status}: {text}",
            status=status,
            reason=f"http_{status}",
            retry_after=retry_after,
        )
    if error_type in CREDENTIAL_ERRORS and status not in (401, 403):
        status = 403
    code = None
    if error_type == "ValidationException" and (
        looks_like_context_length(None, message)
        or any(marker in message.lower() for marker in _CONTEXT_MARKERS)
    ):
        code = "context_length_exceeded"
    return classify_http_failure(status, text, code=code, retry_after=retry_after)


def stream_failure(name: str, payload: bytes) -> UpstreamError:
    """A mid-stream exception (or error) event as the failure it would be over HTTP."""
    try:
        data: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        data = None
    message = data.get("message") if isinstance(data, dict) else None
    if not isinstance(message, str) or not message:
        message = payload[:300].decode("utf-8", "replace") or "no error message"
    status = STREAM_EXCEPTION_STATUS.get(name, 500)
    error = failure(status, name[:1].upper() + name[1:], message)
    if error.outcome is Outcome.UNAVAILABLE:
        error.message = f"upstream failed mid-stream: {error.message}"
        error.reason = "stream_error"
    return error
