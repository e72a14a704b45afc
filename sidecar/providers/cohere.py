"""The `cohere` kind: Cohere's v2 Chat API (`POST {base_url}/v2/chat`), translated both ways,
and its Embed API (`POST {base_url}/v2/embed`) for `/v1/embeddings` (cohere_embed).

The request side is `cohere_request` (what is translated, dropped and refused), the answer
side `cohere_answer` (content, tool calls, finish reasons, billed usage, stream events). Here:
where the API lives, how it authenticates (`Authorization: Bearer`), what the kind can do, and
how its errors map onto Outcomes (SPEC 2.2).

Cohere's error body is `{"id": ..., "message": ...}` (no code field: the status and the
message's words are all there is). 429, 5xx and 499 (the request was cancelled on Cohere's
side) escalate; 401, 498 (invalid token) and 402 (the account's billing limit) are the
gateway's credentials or account, not the request: they escalate too, their message kept for
the log. A 400 whose message starts `too many tokens` is a context-length failure when it is
the prompt that is too long, and the request's fault when it is `max_tokens` above the model's
output limit. Any other 4xx is the request's fault, with Cohere's message.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import orjson

from sidecar.errors import GatewayError, Outcome, UpstreamError, classify_http_failure
from sidecar.providers.base import Completion, HttpRequest, KindCaps, StreamDecoder, UpstreamCall
from sidecar.providers.cohere_answer import CohereStreamDecoder, completion
from sidecar.providers.cohere_embed import BATCH as EMBED_BATCH
from sidecar.providers.cohere_embed import embed_answer, embed_body
from sidecar.providers.cohere_request import chat_body
from sidecar.providers.native_embeddings import BatchLimit
from sidecar.providers.openai_compat import parse_error_envelope, retry_after_seconds
from sidecar.settings.model import ProviderSettings

BASE_URL = "https://api.cohere.com"  # the cohere SDK's ClientEnvironment.PRODUCTION
# tools, images (Command A Vision), json_object with or without a schema, usage at the end of a
# stream; one generation per call; embeddings (/v2/embed)
CAPS = KindCaps(
    tools=True, vision=True, json_schema=True, json_object=True, n=False, embeddings=True
)
EMBED_API = "Cohere Embed API"
_CREDENTIALS = MappingProxyType({401: "key", 498: "key", 402: "account's billing"})
_TOO_MANY_TOKENS = "too many tokens"
_OUTPUT_LIMIT_WORDS = ("max tokens", "max_tokens", "maximum output")


def error_message(body: bytes) -> str:
    """The message of a Cohere error body (`{"id", "message"}`), or of an OpenAI-style
    envelope a proxy in front of it may answer, or the start of the body."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("message"), str) and data["message"]:
        return str(data["message"])
    return parse_error_envelope(body)[0]


class CohereAdapter:
    """Built once per configured `cohere` provider."""

    def __init__(self, settings: ProviderSettings) -> None:
        self.name = settings.name
        self.caps = CAPS
        self.native_json_schema = (
            CAPS.json_schema if settings.native_json_schema is None else settings.native_json_schema
        )
        self.json_mode = CAPS.json_object
        base = (settings.base_url or BASE_URL).rstrip("/")
        self.url = base + "/v2/chat"
        self.embed_url = base + "/v2/embed"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if settings.api_key:
            headers["Authorization"] = "Bearer " + settings.api_key
        headers.update(settings.headers)
        self.headers = headers
        self.stream_headers = {**headers, "Accept": "text/event-stream"}

    def build_request(self, call: UpstreamCall) -> HttpRequest:
        body = chat_body(call.body, call.model_id, call.stream, self.name, call.max_output)
        headers = self.stream_headers if call.stream else self.headers
        if call.headers:
            headers = {**headers, **call.headers}
        return HttpRequest(self.url, headers, orjson.dumps(body))

    def parse_response(self, body: bytes, call: UpstreamCall) -> Completion:
        return completion(body, call.model_id)

    def embeddings_batch(self, model_id: str) -> BatchLimit:
        return BatchLimit(EMBED_BATCH)

    def build_embeddings_request(self, call: UpstreamCall) -> HttpRequest:
        body = embed_body(call.body, self.name, EMBED_API)
        headers = {**self.headers, **call.headers} if call.headers else self.headers
        return HttpRequest(self.embed_url, headers, orjson.dumps({"model": call.model_id, **body}))

    def parse_embeddings_response(
        self, body: bytes, call: UpstreamCall, headers: Mapping[str, str]
    ) -> Completion:
        return embed_answer(body, call.model_id, call.body, None)

    def classify_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
        message = error_message(body)
        retry_after = retry_after_seconds(headers)
        if status in _CREDENTIALS:
            return UpstreamError(
                Outcome.UNAVAILABLE,
                f"the provider refused the gateway's {_CREDENTIALS[status]} (HTTP {status}); "
                "the sidecar's log has the provider's answer",
                status=status,
                reason=f"http_{status}",
                retry_after=retry_after,
                detail=message,
            )
        if status == 499:
            return UpstreamError(
                Outcome.UNAVAILABLE,
                f"upstream cancelled the request (499): {message}",
                status=status,
                reason="http_499",
            )
        if status == 400 and message.lower().startswith(_TOO_MANY_TOKENS):
            lowered = message.lower()
            if not any(words in lowered for words in _OUTPUT_LIMIT_WORDS):
                return UpstreamError(
                    Outcome.CONTEXT_LENGTH,
                    f"upstream rejected the prompt as too long: {message}",
                    status=status,
                    reason="context_length",
                )
            error = GatewayError(400, "invalid_request", message, param="max_tokens")
            return UpstreamError(
                Outcome.CLIENT_FAULT, message, status=status, reason="http_400",
                client_error=error,
            )  # fmt: skip
        return classify_http_failure(status, message, retry_after=retry_after)

    def stream_decoder(self, call: UpstreamCall) -> StreamDecoder:
        options = call.body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        return CohereStreamDecoder(wants_usage, call.keep_content, call.model_id)
