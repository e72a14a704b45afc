"""OpenAI-compatible providers: one adapter, and a typed table with a row per kind.

A row says where the provider lives, how it authenticates and what it does not accept; the
adapter forwards everything else untouched (unknown parameters pass through, SPEC 2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from sidecar.errors import Outcome, UpstreamError, classify_http_failure
from sidecar.providers.base import (
    Completion,
    HttpRequest,
    KindCaps,
    StreamDecoder,
    UpstreamCall,
    Usage,
)
from sidecar.settings.model import ProviderSettings


@dataclass(frozen=True, slots=True)
class CompatKind:
    kind: str
    base_url: str
    auth_header: str = "Authorization"
    auth_prefix: str = "Bearer "
    drop_params: frozenset[str] = frozenset()
    rename_params: Mapping[str, str] = field(default_factory=dict)
    caps: KindCaps = field(default_factory=KindCaps)


COMPAT_KINDS: Mapping[str, CompatKind] = {
    row.kind: row
    for row in (
        CompatKind("openai", "https://api.openai.com/v1"),
        CompatKind("vllm", "http://127.0.0.1:8000/v1"),
    )
}


def parse_error_envelope(body: bytes) -> tuple[str, str | None, str | None, str | None]:
    """(message, code, type, param) from an OpenAI-style error body, tolerating anything."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body[:300].decode("utf-8", "replace").strip()
        return text or "no error body", None, None, None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        return (
            str(error.get("message") or "upstream error"),
            str(code) if code is not None else None,
            error.get("type") if isinstance(error.get("type"), str) else None,
            error.get("param") if isinstance(error.get("param"), str) else None,
        )
    if isinstance(error, str):
        return error, None, None, None
    return body[:300].decode("utf-8", "replace"), None, None, None


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After") or headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def bad_body(what: str) -> UpstreamError:
    return UpstreamError(
        Outcome.UNAVAILABLE, f"upstream answered an unparseable body: {what}", reason="bad_body"
    )


class OpenAICompatAdapter:
    """Adapter for every row of COMPAT_KINDS; built once per configured provider."""

    def __init__(self, settings: ProviderSettings, row: CompatKind) -> None:
        self.row = row
        self.caps = row.caps
        self.native_json_schema = (
            row.caps.json_schema
            if settings.native_json_schema is None
            else settings.native_json_schema
        )
        self.json_mode = row.caps.json_object
        self.url = (settings.base_url or row.base_url).rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if settings.api_key:
            headers[row.auth_header] = row.auth_prefix + settings.api_key
        headers.update(settings.headers)
        self.headers = headers

    def build_request(self, call: UpstreamCall) -> HttpRequest:
        body: dict[str, Any] = dict(call.body)
        body["model"] = call.model_id
        for name in self.row.drop_params:
            body.pop(name, None)
        for old, new in self.row.rename_params.items():
            if old in body:
                body[new] = body.pop(old)
        if call.stream:
            body["stream"] = True
            if self.row.caps.usage_in_stream:
                options = body.get("stream_options")
                body["stream_options"] = {
                    **(options if isinstance(options, dict) else {}),
                    "include_usage": True,
                }
        headers = {**self.headers, **call.headers} if call.headers else self.headers
        return HttpRequest(self.url, headers, orjson.dumps(body))

    def parse_response(self, body: bytes, call: UpstreamCall) -> Completion:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise bad_body("not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise bad_body("no choices")
        return Completion(data, Usage.from_openai(data.get("usage")), raw=body)

    def classify_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
        message, code, error_type, param = parse_error_envelope(body)
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
        return OpenAIStreamDecoder(wants_usage, call.keep_content)


class OpenAIStreamDecoder:
    """Passes OpenAI chunks through byte for byte; reads usage and content on the way."""

    __slots__ = ("_content", "finished", "keep_content", "produced", "usage", "wants_usage")

    def __init__(self, wants_usage: bool, keep_content: bool = False) -> None:
        self.wants_usage = wants_usage
        self.keep_content = keep_content
        self.usage: Usage | None = None
        self._content: list[str] = []
        self.produced = 0
        self.finished = False

    @property
    def content(self) -> str:
        return "".join(self._content)

    def feed(self, event: str | None, data: bytes) -> list[bytes]:
        if data == b"[DONE]":
            self.finished = True
            return []
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise bad_body("a stream event is not JSON") from None
        if not isinstance(chunk, dict):
            raise bad_body("a stream event is not an object")
        if "error" in chunk:
            message = parse_error_envelope(data)[0]
            raise UpstreamError(
                Outcome.UNAVAILABLE, f"upstream failed mid-stream: {message}", reason="stream_error"
            )
        choices = chunk.get("choices")
        if choices:
            delta = choices[0].get("delta") if isinstance(choices[0], dict) else None
            if isinstance(delta, dict):
                piece = delta.get("content")
                if isinstance(piece, str):
                    self.produced += len(piece)
                    if self.keep_content:
                        self._content.append(piece)
        usage = chunk.get("usage")
        if usage:
            self.usage = Usage.from_openai(usage)
            if not self.wants_usage and not choices:
                return []  # the usage chunk we asked for on our own
        elif "usage" in chunk and not self.wants_usage:
            # `"usage": null` is there only because we asked for usage: OpenAI omits it otherwise
            del chunk["usage"]
            return [orjson.dumps(chunk)]
        return [data]
