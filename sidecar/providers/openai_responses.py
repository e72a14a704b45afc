"""OpenAI's Responses API as the kinds that have it natively take it (openai, azure): the
client's request sent as it is, the provider's model id in `model`; its `response` object and
its stream events read for usage only (both are forwarded untouched)."""

from __future__ import annotations

from typing import Any

import orjson

from sidecar.errors import Outcome, UpstreamError
from sidecar.providers.base import MAX_TOKENS, Completion, UpstreamCall, Usage

# the events that end a response, each carrying the final `response` with its usage
FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
# the events whose `delta` is output (to estimate usage a cut stream never reported)
DELTA_EVENTS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_summary_text.delta",
    }
)


def bad_body(what: str) -> UpstreamError:
    return UpstreamError(
        Outcome.UNAVAILABLE, f"upstream answered an unparseable body: {what}", reason="bad_body"
    )


def responses_body(call: UpstreamCall, model: str) -> bytes:
    """The client's Responses request for the provider: its model id (or deployment), and
    `stream` as the call is made (a buffered call never streams)."""
    body: dict[str, Any] = dict(call.body)
    body["model"] = model
    if call.stream:
        body["stream"] = True
    else:
        body.pop("stream", None)
        body.pop("stream_options", None)
    return orjson.dumps(body)


def responses_usage(data: Any) -> Usage | None:
    """A `response` object's `usage` (input_tokens, output_tokens, with their cached and
    reasoning details); None when not sane."""
    if not isinstance(data, dict):
        return None
    given, produced = data.get("input_tokens"), data.get("output_tokens")
    if not isinstance(given, int) or not isinstance(produced, int) or given < 0 or produced < 0:
        return None
    usage = Usage(min(given, MAX_TOKENS), min(produced, MAX_TOKENS))
    details = data.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if isinstance(cached, int) and cached > 0:
        usage.cache_read_tokens = min(cached, usage.prompt_tokens)
    details = data.get("output_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    if isinstance(reasoning, int) and reasoning > 0:
        usage.reasoning_tokens = min(reasoning, usage.completion_tokens)
    return usage


def parse_response_object(body: bytes) -> Completion:
    """A provider's `response` object, kept as its bytes for the client."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_body("not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("output"), list):
        raise bad_body("no output")
    return Completion(data, responses_usage(data.get("usage")), raw=body)


class ResponsesStreamDecoder:
    """Passes a native Responses stream's events through (each the JSON of its data), reading
    the usage of its final event; an `error` event fails the stream as an upstream failure."""

    __slots__ = ("finished", "produced", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.produced = 0
        self.finished = False

    @property
    def content(self) -> str:
        return ""  # a native answer is forwarded as it is, never validated here

    def feed(self, event: str | None, data: bytes) -> list[bytes]:
        if data == b"[DONE]":
            self.finished = True
            return []
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise bad_body("a stream event is not JSON") from None
        if not isinstance(parsed, dict):
            raise bad_body("a stream event is not an object")
        kind = parsed.get("type")
        if kind == "error" or (kind is None and "error" in parsed):
            error = parsed.get("error")
            message = parsed.get("message") or (
                error.get("message") if isinstance(error, dict) else error
            )
            if not isinstance(message, str) or not message:
                message = "an error event"
            raise UpstreamError(
                Outcome.UNAVAILABLE, f"upstream failed mid-stream: {message}", reason="stream_error"
            )
        if kind in DELTA_EVENTS:
            delta = parsed.get("delta")
            if isinstance(delta, str):
                self.produced += len(delta)
        elif kind in FINAL_EVENTS:
            response = parsed.get("response")
            if isinstance(response, dict):
                self.usage = responses_usage(response.get("usage"))
            self.finished = True
        return [data]
