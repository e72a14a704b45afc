"""The `anthropic` kind: Anthropic's Messages API, translated both ways.

The request side is `anthropic_request` (what is translated, dropped and refused), the answer
side `anthropic_answer`. Here: where the API lives, how it authenticates, what the kind can do,
and how its errors map onto Outcomes (SPEC 2.2): 529 `overloaded_error` and 5xx, 429 (with its
`retry-after`) and 401/403 escalate; "prompt is too long" and "input length and `max_tokens`
exceed context limit" are context-length failures; any other 4xx is the request's fault.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from sidecar.errors import UpstreamError, classify_http_failure
from sidecar.providers.anthropic_answer import AnthropicStreamDecoder, completion
from sidecar.providers.anthropic_request import messages_body, output_tool
from sidecar.providers.base import Completion, HttpRequest, KindCaps, StreamDecoder, UpstreamCall
from sidecar.providers.openai_compat import parse_error_envelope, retry_after_seconds
from sidecar.settings.model import ProviderSettings

BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
# json_schema natively through a forced tool; no JSON mode: json_object takes the instruction path
CAPS = KindCaps(tools=True, vision=True, json_schema=True, json_object=False, n=False)
_CONTEXT_LIMIT = "exceed context limit"  # "input length and `max_tokens` exceed context limit"


class AnthropicAdapter:
    """Built once per configured `anthropic` provider."""

    def __init__(self, settings: ProviderSettings) -> None:
        self.name = settings.name
        self.caps = CAPS
        self.native_json_schema = (
            CAPS.json_schema if settings.native_json_schema is None else settings.native_json_schema
        )
        self.json_mode = CAPS.json_object
        self.url = (settings.base_url or BASE_URL).rstrip("/") + "/v1/messages"
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "anthropic-version": API_VERSION,
        }
        if settings.api_key:
            headers["x-api-key"] = settings.api_key
        headers.update(settings.headers)
        self.headers = headers

    def build_request(self, call: UpstreamCall) -> HttpRequest:
        body = messages_body(call.body, call.model_id, call.max_output, call.stream, self.name)
        headers = {**self.headers, **call.headers} if call.headers else self.headers
        return HttpRequest(self.url, headers, orjson.dumps(body))

    def parse_response(self, body: bytes, call: UpstreamCall) -> Completion:
        return completion(body, output_tool(call.body))

    def classify_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
        message, code, error_type, param = parse_error_envelope(body)
        if status == 400 and _CONTEXT_LIMIT in message:
            code = "context_length_exceeded"
        return classify_http_failure(
            status,
            message,
            code=code,
            error_type=error_type,
            param=param,
            retry_after=retry_after_seconds(headers),
        )

    def stream_decoder(self, call: UpstreamCall) -> StreamDecoder:
        options = call.body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        return AnthropicStreamDecoder(wants_usage, call.keep_content, output_tool(call.body))
