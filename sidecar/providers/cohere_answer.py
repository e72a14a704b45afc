"""Cohere v2 Chat answers → OpenAI `chat.completion` and `chat.completion.chunk` (pure).

The message's text items become the content (thinking items are not shown), `tool_calls` stay
tool calls, and the `tool_plan` Cohere writes before calling tools is the content beside them
(as OpenAI models write text before a call). `finish_reason` COMPLETE and STOP_SEQUENCE →
stop, MAX_TOKENS → length, TOOL_CALL → tool_calls; ERROR and TIMEOUT are no answer but an
upstream failure (escalates in a cascade; mid-stream, the stream's error event).

Usage is what Cohere bills: `usage.billed_units` (input and output tokens, which leave out the
tokens of Cohere's own prompt template that `usage.tokens` counts); `usage.tokens` only when
no billed units are given. `cached_tokens` is reported as `prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import time
from types import MappingProxyType
from typing import Any

import orjson

from sidecar.errors import Outcome, UpstreamError
from sidecar.providers.base import MAX_TOKENS, Completion, Usage
from sidecar.providers.chunk_stream import ChunkStream
from sidecar.providers.openai_compat import bad_body

FINISH_REASONS = MappingProxyType(
    {
        "COMPLETE": "stop",
        "STOP_SEQUENCE": "stop",
        "MAX_TOKENS": "length",
        "TOOL_CALL": "tool_calls",
    }
)
FAILED = frozenset({"ERROR", "TIMEOUT"})


def failed(reason: str, message: Any, streaming: bool) -> UpstreamError:
    """A generation Cohere ended with ERROR or TIMEOUT: an upstream failure."""
    where = "mid-stream" if streaming else "the generation"
    detail = f": {message}" if isinstance(message, str) and message else ""
    return UpstreamError(
        Outcome.UNAVAILABLE,
        f"upstream failed {where} (finish_reason {reason}){detail}",
        reason="timeout" if reason == "TIMEOUT" else "stream_error" if streaming else "error",
    )


def finish_reason(reason: Any, has_calls: bool) -> str:
    mapped = FINISH_REASONS.get(reason, "stop") if isinstance(reason, str) else "stop"
    if mapped == "tool_calls" and not has_calls:
        return "stop"
    return mapped


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return min(int(value), MAX_TOKENS)


def usage_of(usage: Any) -> tuple[Usage, dict[str, Any]] | None:
    """(what is charged, the OpenAI `usage` object) of a v2 `usage`, None without one."""
    if not isinstance(usage, dict):
        return None
    for source in ("billed_units", "tokens"):
        counts = usage.get(source)
        if not isinstance(counts, dict):
            continue
        prompt, completion = _count(counts.get("input_tokens")), _count(counts.get("output_tokens"))
        if prompt is None and completion is None:
            continue
        charged = Usage(prompt or 0, completion or 0)
        answer: dict[str, Any] = charged.as_openai()
        cached = _count(usage.get("cached_tokens"))
        if cached is not None:
            answer["prompt_tokens_details"] = {"cached_tokens": min(cached, charged.prompt_tokens)}
        return charged, answer
    return None


def _calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    calls = message.get("tool_calls")
    out: list[dict[str, Any]] = []
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = orjson.dumps(arguments if arguments is not None else {}).decode()
        out.append(
            {"id": str(call.get("id") or f"call_{len(out)}"), "type": "function",
             "function": {"name": str(function.get("name") or ""), "arguments": arguments}}
        )  # fmt: skip
    return out


def completion(body: bytes, model_id: str) -> Completion:
    """A v2 Chat answer as an OpenAI chat.completion."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_body("not JSON") from None
    message = data.get("message") if isinstance(data, dict) else None
    if not isinstance(message, dict):
        raise bad_body("no message")
    reason = data.get("finish_reason")
    if reason in FAILED:
        raise failed(reason, data.get("error") or data.get("error_message"), streaming=False)
    content = message.get("content")
    texts = [
        item["text"]
        for item in (content if isinstance(content, list) else ())
        if isinstance(item, dict) and item.get("type") == "text" and isinstance(item["text"], str)
    ]
    calls = _calls(message)
    plan = message.get("tool_plan")
    if calls and not texts and isinstance(plan, str) and plan:
        texts = [plan]
    answer_message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
    }
    if calls:
        answer_message["tool_calls"] = calls
    answer: dict[str, Any] = {
        "id": str(data.get("id") or "chat"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [
            {"index": 0, "message": answer_message, "logprobs": None,
             "finish_reason": finish_reason(reason, bool(calls))}
        ],
    }  # fmt: skip
    counted = usage_of(data.get("usage"))
    if counted is not None:
        answer["usage"] = counted[1]
    return Completion(answer, counted[0] if counted is not None else None)


class CohereStreamDecoder(ChunkStream):
    """v2 stream events → OpenAI chunks.

    The opening chunk (role) waits for the first text or tool call, so that a failure right
    after `message-start` still counts as one before the first chunk (the cascade may escalate
    from it). Text deltas (not thinking) and tool-plan deltas are content; each
    `tool-call-start` opens a tool call with its own OpenAI index, its `tool-call-delta`s are the
    call's argument deltas. `message-end` gives the finish_reason chunk, then the usage chunk
    when the client asked for it; with finish_reason ERROR or TIMEOUT it is a failure instead.
    """

    __slots__ = ("_calls",)

    def __init__(self, wants_usage: bool, keep_content: bool, model_id: str) -> None:
        super().__init__(wants_usage, keep_content, "chat", model_id)
        self._calls: dict[Any, int] = {}  # Cohere's tool call index → OpenAI's

    def feed(self, event: str | None, data: bytes) -> list[bytes]:
        if data == b"[DONE]":
            self.finished = True
            return []
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise bad_body("a stream event is not JSON") from None
        if not isinstance(payload, dict):
            raise bad_body("a stream event is not an object")
        kind = payload.get("type") or event
        message = _delta_message(payload)
        # content-start's text is "" as v2 sends it; any other is content
        if kind == "content-delta" or kind == "content-start":
            content = message.get("content")
            text = content.get("text") if isinstance(content, dict) else None
            return self._text(text) if isinstance(text, str) else []
        if kind == "tool-call-delta":
            call = message.get("tool_calls")
            function = call.get("function") if isinstance(call, dict) else None
            piece = function.get("arguments") if isinstance(function, dict) else None
            index = payload.get("index")
            if not isinstance(piece, str) or not piece or index not in self._calls:
                return []
            return self._arguments(self._calls[index], piece)
        if kind == "tool-plan-delta":
            plan = message.get("tool_plan")
            return self._text(plan) if isinstance(plan, str) else []
        if kind == "tool-call-start":
            return self._call_start(payload.get("index"), message)
        if kind == "message-start":
            if isinstance(payload.get("id"), str) and payload["id"]:
                self._base["id"] = payload["id"]
            return []
        if kind == "message-end":
            return self._end(payload)
        return []  # content-end, tool-call-end, citations, debug, event types added later

    def _call_start(self, index: Any, message: dict[str, Any]) -> list[bytes]:
        call = message.get("tool_calls")
        if not isinstance(call, dict):
            return []
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        position = self._calls.setdefault(index, len(self._calls))
        arguments = function.get("arguments")
        return self._tool_call(
            position,
            str(call.get("id") or f"call_{position}"),
            str(function.get("name") or ""),
            arguments if isinstance(arguments, str) else "",
        )

    def _end(self, payload: dict[str, Any]) -> list[bytes]:
        delta = payload.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        reason = delta.get("finish_reason")
        if reason in FAILED:
            raise failed(reason, delta.get("error"), streaming=True)
        counted = usage_of(delta.get("usage"))
        if counted is not None:
            self.usage = counted[0]
        self.finished = True
        out = self._emit({}, finish_reason(reason, bool(self._calls)))
        if self.wants_usage and counted is not None:
            out.append(self._usage_chunk(counted[1]))
        return out


def _delta_message(payload: dict[str, Any]) -> dict[str, Any]:
    delta = payload.get("delta")
    message = delta.get("message") if isinstance(delta, dict) else None
    return message if isinstance(message, dict) else {}
