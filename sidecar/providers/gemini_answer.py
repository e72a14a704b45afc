"""Gemini `GenerateContentResponse`s → OpenAI `chat.completion` and `chat.completion.chunk`.

Each candidate is a choice (its `index`); its text parts are the content (thought parts are not
shown), its `functionCall` parts the `tool_calls` (arguments as a JSON string; the id Gemini
gave, else a generated one; a thought signature kept as Google's OpenAI endpoint keeps it, in
`extra_content.google.thought_signature`, for the request side to send back). `finishReason`:
STOP → stop (tool_calls when the candidate called functions), MAX_TOKENS → length, the safety,
recitation, blocklist and prohibited-content reasons → content_filter, anything else → stop. A
prompt Gemini blocked (`promptFeedback.blockReason`, no candidates) is one choice with no
content, a `refusal` naming the reason and finish_reason content_filter.

Usage: prompt tokens are `promptTokenCount` + `toolUsePromptTokenCount` (priced as input),
completion tokens `candidatesTokenCount` + `thoughtsTokenCount` (thinking is billed as output,
also reported as `completion_tokens_details.reasoning_tokens`); cached tokens (part of the
prompt count) as `prompt_tokens_details.cached_tokens`. A stream's chunks each carry the usage
so far: the last one counts, none is added.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import orjson

from sidecar.errors import Outcome, UpstreamError
from sidecar.ids import new_id
from sidecar.providers.base import MAX_TOKENS, Completion, Usage
from sidecar.providers.openai_compat import bad_body

FILTERED = "content_filter"
FINISH_REASONS = MappingProxyType(
    {
        "STOP": "stop",
        "MAX_TOKENS": "length",
        **dict.fromkeys(
            ("SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
             "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "MODEL_ARMOR"),
            FILTERED,
        ),
    }
)  # fmt: skip


def _count(value: Any) -> int:
    return min(value, MAX_TOKENS) if isinstance(value, int) and value > 0 else 0


def token_usage(meta: Any) -> tuple[Usage, dict[str, Any]] | None:
    """(Usage, OpenAI usage object) of a `usageMetadata`, or None when there is none."""
    if not isinstance(meta, dict):
        return None
    prompt = _count(meta.get("promptTokenCount")) + _count(meta.get("toolUsePromptTokenCount"))
    thoughts = _count(meta.get("thoughtsTokenCount"))
    completion = _count(meta.get("candidatesTokenCount")) + thoughts
    cached = _count(meta.get("cachedContentTokenCount"))
    usage = Usage(min(prompt, MAX_TOKENS), min(completion, MAX_TOKENS))
    usage.cache_read_tokens = min(cached, usage.prompt_tokens)  # promptTokenCount holds them
    usage.reasoning_tokens = min(thoughts, usage.completion_tokens)
    return usage, {
        **usage.as_openai(),
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": thoughts},
    }


def finish_reason(reason: Any, called: bool) -> str:
    mapped = FINISH_REASONS.get(reason, "stop") if isinstance(reason, str) else "stop"
    return "tool_calls" if called and mapped == "stop" else mapped


def tool_call(function_call: Mapping[str, Any], signature: Any) -> dict[str, Any]:
    """An OpenAI tool call for a Gemini `functionCall` part."""
    given = function_call.get("id")
    call: dict[str, Any] = {
        "id": given if isinstance(given, str) and given else f"call_{new_id()}",
        "type": "function",
        "function": {
            "name": str(function_call.get("name") or ""),
            "arguments": orjson.dumps(function_call.get("args") or {}).decode(),
        },
    }
    if isinstance(signature, str) and signature:
        call["extra_content"] = {"google": {"thought_signature": signature}}
    return call


def _parts(candidate: Mapping[str, Any]) -> list[dict[str, Any]]:
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


def block_reason(data: Mapping[str, Any]) -> str | None:
    """Why Gemini blocked the prompt, when it did (then there are no candidates)."""
    feedback = data.get("promptFeedback")
    reason = feedback.get("blockReason") if isinstance(feedback, dict) else None
    return str(reason) if reason else None


def _refusal(reason: str) -> str:
    return f"Gemini blocked the prompt ({reason})"


def _load(body: bytes, what: str) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_body(f"{what} is not JSON") from None
    if not isinstance(data, dict):
        raise bad_body(f"{what} is not an object")
    if isinstance(data.get("error"), dict):
        message = data["error"].get("message") or data["error"].get("status") or "error"
        raise UpstreamError(
            Outcome.UNAVAILABLE, f"upstream failed mid-stream: {message}", reason="stream_error"
        )
    return data


def completion(body: bytes, model_id: str) -> Completion:
    """A generateContent answer as an OpenAI chat.completion."""
    data = _load(body, "the answer")
    candidates = data.get("candidates")
    choices: list[dict[str, Any]] = []
    for position, candidate in enumerate(candidates if isinstance(candidates, list) else ()):
        if not isinstance(candidate, dict):
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for part in _parts(candidate):
            if isinstance(part.get("functionCall"), dict):
                calls.append(tool_call(part["functionCall"], part.get("thoughtSignature")))
            elif isinstance(part.get("text"), str) and not part.get("thought"):
                texts.append(part["text"])
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(texts) if texts or not calls else None,
            "refusal": None,
        }
        if calls:
            message["tool_calls"] = calls
        index = candidate.get("index")
        reason = finish_reason(candidate.get("finishReason"), bool(calls))
        choices.append(
            {"index": index if isinstance(index, int) else position, "message": message,
             "logprobs": None, "finish_reason": reason}
        )  # fmt: skip
    if not choices:
        blocked = block_reason(data)
        if blocked is None:
            raise bad_body("no candidates")
        message = {"role": "assistant", "content": None, "refusal": _refusal(blocked)}
        choices = [{"index": 0, "message": message, "logprobs": None, "finish_reason": FILTERED}]
    choices.sort(key=lambda choice: choice["index"])
    answer: dict[str, Any] = {
        "id": str(data.get("responseId") or f"chatcmpl-{new_id()}"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(data.get("modelVersion") or model_id),
        "choices": choices,
    }
    counted = token_usage(data.get("usageMetadata"))
    if counted is not None:
        answer["usage"] = counted[1]
    return Completion(answer, counted[0] if counted else None)


class GeminiStreamDecoder:
    """`streamGenerateContent?alt=sse` events → OpenAI chunks.

    Every event is a whole GenerateContentResponse holding the new parts of each candidate. A
    choice's opening chunk (role) waits for its first content or call, so that a failure before
    any counts as one before the first chunk (a cascade may still escalate). Gemini sends a
    function call whole, so each is one tool call delta with its arguments complete. The
    stream is finished when every expected choice has its finishReason (or the prompt was
    blocked); the usage chunk follows then when the client asked for it. Gemini ends the
    response without a `[DONE]`."""

    __slots__ = (
        "_base", "_calls", "_choices", "_content", "_done", "_meta", "_model", "_opened",
        "finished", "keep_content", "produced", "usage", "wants_usage",
    )  # fmt: skip

    def __init__(self, wants_usage: bool, keep_content: bool, choices: int, model_id: str) -> None:
        self.wants_usage = wants_usage
        self.keep_content = keep_content
        self.usage: Usage | None = None
        self.produced = 0
        self.finished = False
        self._choices = max(1, choices)
        self._content: list[str] = []
        self._base: dict[str, Any] | None = None
        self._meta: dict[str, Any] | None = None  # the OpenAI usage object, latest
        self._model = model_id
        self._opened: set[int] = set()
        self._calls: dict[int, int] = {}  # choice → tool calls so far
        self._done: set[int] = set()

    @property
    def content(self) -> str:
        return "".join(self._content)

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return orjson.dumps({**(self._base or {}), "choices": [choice]})

    def _emit(self, index: int, delta: dict[str, Any], finish: str | None = None) -> list[bytes]:
        out = []
        if index not in self._opened:
            self._opened.add(index)
            out.append(self._chunk(index, {"role": "assistant", "content": ""}))
        out.append(self._chunk(index, delta, finish))
        return out

    def feed(self, event: str | None, data: bytes) -> list[bytes]:
        payload = _load(data, "a stream event")
        if self._base is None:
            self._base = {
                "id": str(payload.get("responseId") or f"chatcmpl-{new_id()}"),
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": str(payload.get("modelVersion") or self._model),
            }
        counted = token_usage(payload.get("usageMetadata"))
        if counted is not None:
            self.usage, self._meta = counted
        out: list[bytes] = []
        candidates = payload.get("candidates")
        for position, candidate in enumerate(candidates if isinstance(candidates, list) else ()):
            if isinstance(candidate, dict):
                index = candidate.get("index")
                out += self._candidate(index if isinstance(index, int) else position, candidate)
        if not candidates:
            blocked = block_reason(payload)
            if blocked is not None:
                self._done.update(range(self._choices))
                out += self._emit(0, {"refusal": _refusal(blocked)}, FILTERED)
        if len(self._done) >= self._choices:
            self.finished = True
            if self.wants_usage and self._meta is not None:
                out.append(orjson.dumps({**(self._base or {}), "choices": [], "usage": self._meta}))
        return out

    def _candidate(self, index: int, candidate: Mapping[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        for part in _parts(candidate):
            if isinstance(part.get("functionCall"), dict):
                call = tool_call(part["functionCall"], part.get("thoughtSignature"))
                number = self._calls.get(index, 0)
                self._calls[index] = number + 1
                self.produced += 1 + len(call["function"]["arguments"])
                out += self._emit(index, {"tool_calls": [{"index": number, **call}]})
            elif isinstance(part.get("text"), str) and part["text"] and not part.get("thought"):
                text = part["text"]
                self.produced += len(text)
                if self.keep_content and index == 0:
                    self._content.append(text)
                out += self._emit(index, {"content": text})
        reason = candidate.get("finishReason")
        if reason and index not in self._done:
            self._done.add(index)
            out += self._emit(index, {}, finish_reason(reason, index in self._calls))
        return out
