"""Anthropic Messages answers → OpenAI `chat.completion` and `chat.completion.chunk` (pure).

Text blocks become the message's content, `tool_use` blocks its `tool_calls` (arguments as a
JSON string), except the output tool of a json_schema request, whose input becomes the content
(finish_reason `stop`). Thinking blocks are not shown. Usage: prompt tokens are
`input_tokens` + `cache_read_input_tokens` + `cache_creation_input_tokens` (all priced as
input), the cache reads also reported as `prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import time
from types import MappingProxyType
from typing import Any

import orjson

from sidecar.errors import Outcome, UpstreamError
from sidecar.providers.anthropic_request import OutputTool
from sidecar.providers.base import MAX_TOKENS, Completion, Usage
from sidecar.providers.chunk_stream import BlockStream
from sidecar.providers.openai_compat import bad_body

FINISH_REASONS = MappingProxyType(
    {
        "end_turn": "stop",
        "stop_sequence": "stop",
        "pause_turn": "stop",
        "max_tokens": "length",
        "model_context_window_exceeded": "length",
        "tool_use": "tool_calls",
        "refusal": "content_filter",
    }
)


def _count(value: Any) -> int:
    return min(value, MAX_TOKENS) if isinstance(value, int) and value > 0 else 0


class TokenCount:
    """Anthropic's usage fields as they arrive (a stream sends them in two events)."""

    __slots__ = ("cache_creation", "cache_hour", "cache_read", "input", "output")

    def __init__(self) -> None:
        self.input = self.cache_read = self.cache_creation = self.output = 0
        self.cache_hour = 0  # the part of cache_creation written to the one-hour cache

    def update(self, usage: Any) -> bool:
        """Take the fields `usage` has; whether it was a usage object."""
        if not isinstance(usage, dict):
            return False
        if "input_tokens" in usage and usage["input_tokens"] is not None:
            self.input = _count(usage["input_tokens"])
        if usage.get("cache_read_input_tokens") is not None:
            self.cache_read = _count(usage["cache_read_input_tokens"])
        if usage.get("cache_creation_input_tokens") is not None:
            self.cache_creation = _count(usage["cache_creation_input_tokens"])
        by_ttl = usage.get("cache_creation")
        if isinstance(by_ttl, dict) and by_ttl.get("ephemeral_1h_input_tokens") is not None:
            self.cache_hour = _count(by_ttl["ephemeral_1h_input_tokens"])
        if usage.get("output_tokens") is not None:
            self.output = _count(usage["output_tokens"])
        return True

    def usage(self) -> Usage:
        prompt = min(self.input + self.cache_read + self.cache_creation, MAX_TOKENS)
        return Usage(
            prompt,
            self.output,
            cache_read_tokens=min(self.cache_read, prompt),
            cache_write_tokens=min(self.cache_creation, prompt),
            cache_write_1h_tokens=min(self.cache_hour, self.cache_creation, prompt),
        )

    def as_openai(self) -> dict[str, Any]:
        usage = self.usage()
        return {
            **usage.as_openai(),
            "prompt_tokens_details": {"cached_tokens": self.cache_read},
        }


def finish_reason(stop_reason: Any) -> str:
    return FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def completion(body: bytes, answer_tool: OutputTool | None) -> Completion:
    """A Messages answer as an OpenAI chat.completion."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_body("not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("content"), list):
        raise bad_body("no content blocks")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    answered = False
    for block in data["content"]:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use":
            if answer_tool is not None and block.get("name") == answer_tool.name:
                texts = [answer_tool.answer(block.get("input"))]
                answered = True
                continue
            calls.append(
                {"id": str(block.get("id")), "type": "function",
                 "function": {"name": str(block.get("name")),
                              "arguments": orjson.dumps(block.get("input") or {}).decode()}}
            )  # fmt: skip
    reason = finish_reason(data.get("stop_reason"))
    if answered and not calls and reason == "tool_calls":
        reason = "stop"
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    tokens = TokenCount()
    has_usage = tokens.update(data.get("usage"))
    answer = {
        "id": str(data.get("id") or "msg"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(data.get("model") or ""),
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reason}],
    }
    if has_usage:
        answer["usage"] = tokens.as_openai()
    return Completion(answer, tokens.usage() if has_usage else None)


class AnthropicStreamDecoder(BlockStream):
    """Messages stream events → OpenAI chunks.

    The opening chunk (role) waits for the first content or tool call, so that a failure
    right after `message_start` still counts as one before the first chunk (the cascade may
    escalate from it). Each `tool_use` block is a tool call with its own OpenAI index, its
    `input_json_delta`s the call's argument deltas; the output tool's deltas are content
    (held back until the block ends when its answer is wrapped). The finish_reason chunk goes
    out with `message_delta`, the usage chunk at `message_stop` when the client asked for it.
    """

    __slots__ = ("_finish_sent", "_tokens")

    def __init__(
        self, wants_usage: bool, keep_content: bool, answer_tool: OutputTool | None
    ) -> None:
        super().__init__(wants_usage, keep_content, answer_tool, "msg", "")
        self._tokens = TokenCount()
        self._finish_sent = False

    def feed(self, event: str | None, data: bytes) -> list[bytes]:
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise bad_body("a stream event is not JSON") from None
        if not isinstance(payload, dict):
            raise bad_body("a stream event is not an object")
        kind = payload.get("type") or event
        if kind == "content_block_delta":
            delta = payload.get("delta")
            if not isinstance(delta, dict):
                return []
            delta_kind = delta.get("type")
            if delta_kind == "text_delta":
                return self._text(str(delta.get("text") or ""))
            if delta_kind == "input_json_delta":
                return self._tool_input(payload.get("index"), str(delta.get("partial_json") or ""))
            return []  # thinking, signatures, citations
        if kind == "content_block_start":
            return self._start(payload)
        if kind == "message_start":
            message = payload.get("message")
            if isinstance(message, dict):
                self._base["id"] = str(message.get("id") or "msg")
                self._base["model"] = str(message.get("model") or "")
                if self._tokens.update(message.get("usage")):
                    self.usage = self._tokens.usage()
            return []
        if kind == "content_block_stop":
            return self._block_stop(payload.get("index"))
        if kind == "message_delta":
            if self._tokens.update(payload.get("usage")):
                self.usage = self._tokens.usage()
            delta = payload.get("delta")
            stop = delta.get("stop_reason") if isinstance(delta, dict) else None
            return self._finish(stop) if stop is not None else []
        if kind == "message_stop":
            self.finished = True
            out = [] if self._finish_sent else self._finish(None)
            if self.wants_usage:
                out.append(self._usage_chunk(self._tokens.as_openai()))
            return out
        if kind == "error":
            error = payload.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            raise UpstreamError(
                Outcome.UNAVAILABLE,
                f"upstream failed mid-stream: {message or 'error event'}",
                reason="stream_error",
            )
        return []  # ping, and event types added later (Anthropic's versioning policy)

    def _finish(self, stop_reason: Any) -> list[bytes]:
        """The finish_reason chunk, once per stream."""
        if self._finish_sent:
            return []
        self._finish_sent = True
        return self._emit({}, self._finish_reason(finish_reason(stop_reason)))

    def _start(self, payload: dict[str, Any]) -> list[bytes]:
        block = payload.get("content_block")
        index = payload.get("index")
        if not isinstance(block, dict) or not isinstance(index, int):
            return []
        if block.get("type") == "text":
            return self._text(block.get("text") or "")
        if block.get("type") != "tool_use":
            return []
        return self._tool_start(index, block.get("id"), block.get("name"))
