"""The `gemini` kind: Google's Generative Language API (generateContent), translated both ways.

The request side is `gemini_request`, the answer side `gemini_answer`; both serve `vertex` too
(the same bodies on Vertex AI). Here: where the API lives (`{base_url}/{api_version}/models/
{model}:generateContent`, and `:streamGenerateContent?alt=sse` for streams; `api_version`
v1beta unless the provider sets v1 or v1alpha), the key in `x-goog-api-key`, what the kind can
do, and how Google's errors map onto Outcomes (SPEC 2.2), read from the envelope's `status`:
RESOURCE_EXHAUSTED is a 429 (its RetryInfo delay as the retry hint), UNAVAILABLE, INTERNAL and
DEADLINE_EXCEEDED escalate, UNAUTHENTICATED, PERMISSION_DENIED and a rejected API key escalate
as credential failures (the detail goes to the log), FAILED_PRECONDITION (the project's
location or billing) escalates, INVALID_ARGUMENT about the input token count is a context
length failure, any other 4xx is the request's fault. Embeddings: `batchEmbedContents`
(gemini_embed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

import orjson

from sidecar.errors import Outcome, UpstreamError, classify_http_failure
from sidecar.providers.base import Completion, HttpRequest, KindCaps, StreamDecoder, UpstreamCall
from sidecar.providers.gemini_answer import GeminiStreamDecoder, completion
from sidecar.providers.gemini_embed import GEMINI_BATCH, batch_answer, batch_body
from sidecar.providers.gemini_request import generate_body
from sidecar.providers.native_embeddings import BatchLimit
from sidecar.providers.openai_compat import retry_after_seconds
from sidecar.settings.model import ProviderSettings

BASE_URL = "https://generativelanguage.googleapis.com"
API_VERSIONS = frozenset({"v1beta", "v1", "v1alpha"})
# tools, images, json_schema natively (responseJsonSchema), JSON mode, usage, candidateCount,
# embeddings (batchEmbedContents; vertex: :predict)
CAPS = KindCaps(embeddings=True)
_STATUS_AS_HTTP = MappingProxyType(
    {
        "RESOURCE_EXHAUSTED": 429,
        "UNAVAILABLE": 503,
        "INTERNAL": 500,
        "DEADLINE_EXCEEDED": 504,
        "UNAUTHENTICATED": 401,
        "PERMISSION_DENIED": 403,
    }
)
# "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576)";
# Vertex: "... the input token count is 1200000 but model only supports up to 1048576"
_TOKEN_LIMIT = re.compile(r"token count.*(exceeds|only supports up to)", re.IGNORECASE | re.DOTALL)
_SECONDS = re.compile(r"(\d+(?:\.\d+)?)s")


def settings_problems(settings: ProviderSettings) -> list[tuple[str, str]]:
    """(key, message) for what the JSON Schema cannot check about a gemini provider."""
    problems: list[tuple[str, str]] = []
    if settings.api_version is not None and settings.api_version not in API_VERSIONS:
        problems.append(
            ("api_version", f"{settings.api_version!r} is no Gemini API version: v1beta (the "
                            "default), v1 or v1alpha")
        )  # fmt: skip
    headers = {name.lower() for name in settings.headers}
    if not settings.api_key_env and "x-goog-api-key" not in headers:
        problems.append(("", "gemini needs a key: api_key_env names the variable that holds it"))
    return problems


def google_error(body: bytes) -> tuple[str, str, dict[str, Any]]:
    """(message, status, the error object) of a Google API error body, tolerating anything
    (Vertex sometimes wraps the envelope in a list)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:300].decode("utf-8", "replace").strip() or "no error body", "", {}
    if isinstance(data, list) and data:
        data = data[0]
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return body[:300].decode("utf-8", "replace"), "", {}
    status = error.get("status")
    return str(error.get("message") or "upstream error"), str(status or ""), error


def _details(error: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    details = error.get("details")
    return [
        detail
        for detail in (details if isinstance(details, list) else ())
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith(kind)
    ]


def _retry_delay(error: Mapping[str, Any]) -> float | None:
    """RetryInfo's `retryDelay` ("21s", "0.5s"), in seconds."""
    for detail in _details(error, "google.rpc.RetryInfo"):
        match = _SECONDS.fullmatch(str(detail.get("retryDelay", "")))
        if match:
            return float(match.group(1))
    return None


def classify_google_error(status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
    """A Google API failure (Gemini or Vertex) as an UpstreamError (see the module docstring)."""
    message, rpc_status, error = google_error(body)
    retry_after = retry_after_seconds(headers)
    if retry_after is None:
        retry_after = _retry_delay(error)
    key_rejected = any(
        detail.get("reason") == "API_KEY_INVALID" for detail in _details(error, "ErrorInfo")
    )
    if key_rejected:
        status = 401
    elif rpc_status in _STATUS_AS_HTTP:
        status = _STATUS_AS_HTTP[rpc_status]
    elif rpc_status == "FAILED_PRECONDITION":
        return UpstreamError(
            Outcome.UNAVAILABLE,
            f"upstream refused the call (FAILED_PRECONDITION): {message}",
            status=status,
            reason=f"http_{status}",
        )
    code = "context_length_exceeded" if _TOKEN_LIMIT.search(message) else None
    return classify_http_failure(status, message, code=code, retry_after=retry_after)


class GeminiAdapter:
    """Built once per configured `gemini` provider; `vertex` is the same with its own URLs
    and credentials (sidecar/providers/vertex.py)."""

    def __init__(self, settings: ProviderSettings) -> None:
        self.name = settings.name
        self.caps = CAPS
        self.native_json_schema = (
            CAPS.json_schema if settings.native_json_schema is None else settings.native_json_schema
        )
        self.json_mode = CAPS.json_object
        self.root = self.api_root(settings)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        headers.update(self.auth_headers(settings))
        headers.update(settings.headers)  # the provider's own `headers:` win
        self.headers = headers

    def api_root(self, settings: ProviderSettings) -> str:
        """The URL the model paths are appended to."""
        base = (settings.base_url or BASE_URL).rstrip("/")
        return f"{base}/{settings.api_version or 'v1beta'}"

    def auth_headers(self, settings: ProviderSettings) -> dict[str, str]:
        return {"x-goog-api-key": settings.api_key} if settings.api_key else {}

    def model_path(self, model_id: str) -> str:
        """`models/{id}`; an id with a `/` (`tunedModels/…`) is a resource name already."""
        return model_id if "/" in model_id else f"models/{model_id}"

    def url(self, model_id: str, stream: bool) -> str:
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        return f"{self.root}/{quote(self.model_path(model_id), safe='/@')}:{method}"

    def build_request(self, call: UpstreamCall) -> HttpRequest:
        body = generate_body(call.body, self.name, call.max_output)
        headers = {**self.headers, **call.headers} if call.headers else self.headers
        return HttpRequest(self.url(call.model_id, call.stream), headers, orjson.dumps(body))

    def parse_response(self, body: bytes, call: UpstreamCall) -> Completion:
        return completion(body, call.model_id)

    def embeddings_batch(self, model_id: str) -> BatchLimit:
        return GEMINI_BATCH

    def build_embeddings_request(self, call: UpstreamCall) -> HttpRequest:
        name = self.model_path(call.model_id)
        body = batch_body(call.body, name, self.name)
        headers = {**self.headers, **call.headers} if call.headers else self.headers
        url = f"{self.root}/{quote(name, safe='/@')}:batchEmbedContents"
        return HttpRequest(url, headers, orjson.dumps(body))

    def parse_embeddings_response(
        self, body: bytes, call: UpstreamCall, headers: Mapping[str, str]
    ) -> Completion:
        return batch_answer(body, call.body, call.model_id)

    def classify_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
        return classify_google_error(status, body, headers)

    def stream_decoder(self, call: UpstreamCall) -> StreamDecoder:
        options = call.body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        n = call.body.get("n")
        choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
        return GeminiStreamDecoder(wants_usage, call.keep_content, choices, call.model_id)
