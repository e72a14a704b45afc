"""Bedrock Converse answers → OpenAI `chat.completion` and `chat.completion.chunk` (pure).

`text` blocks become the message's content, `toolUse` blocks its `tool_calls` (the input as a
JSON string), except the output tool of a json_schema request, whose input becomes the content
(finish_reason `stop`); reasoning blocks are not shown. `stopReason` → finish_reason as in
FINISH_REASONS; `malformed_model_output` / `malformed_tool_use` (the model's output could not be
read) fail the attempt as an unusable answer, which escalates. Usage: prompt tokens are
`inputTokens` + `cacheReadInputTokens` + `cacheWriteInputTokens` (all priced as input), the
cache reads also reported as `prompt_tokens_details.cached_tokens`. Converse names no model and
gives no id: `model` is the model id called, the id a fresh `chatcmpl-…`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import orjson

from sidecar.errors import Outcome, UpstreamError
from sidecar.ids import new_id
from sidecar.providers.anthropic_request import OutputTool
from sidecar.providers.base import MAX_TOKENS, Completion, Usage
from sidecar.providers.chunk_stream import BlockStream
from sidecar.providers.openai_compat import bad_body

FINISH_REASONS = MappingProxyType(
    {
        "end_turn": "stop",
        "stop_sequence": "stop",
        "tool_use": "tool_calls",
        "max_tokens": "length",
        "model_context_window_exceeded": "length",
        "guardrail_intervened": "content_filter",
        "content_filtered": "content_filter",
    }
)
MALFORMED = frozenset({"malformed_model_output", "malformed_tool_use"})

# A mid-stream exception event, as the failure the same exception would be as an HTTP answer
StreamFailure = Callable[[str, bytes], UpstreamError]


def _count(value: Any) -> int:
    return min(value, MAX_TOKENS) if isinstance(value, int) and value > 0 else 0


def usage_of(usage: Any) -> tuple[Usage, int] | None:
    """(usage, cached prompt tokens) of a Converse `usage` object, None when it is not one."""
    if not isinstance(usage, dict) or "inputTokens" not in usage:
        return None
    cached = _count(usage.get("cacheReadInputTokens"))
    written = _count(usage.get("cacheWriteInputTokens"))
    prompt = min(_count(usage.get("inputTokens")) + cached + written, MAX_TOKENS)
    counted = Usage(
        prompt,
        _count(usage.get("outputTokens")),
        cache_read_tokens=min(cached, prompt),
        cache_write_tokens=min(written, prompt),
    )
    return counted, cached


def usage_openai(usage: Usage, cached: int) -> dict[str, Any]:
    return {**usage.as_openai(), "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(stop_reason: Any) -> str:
    if stop_reason in MALFORMED:
        raise UpstreamError(
            Outcome.UNAVAILABLE,
            f"the model's output could not be read (stopReason {stop_reason})",
            reason="bad_body",
        )
    return FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def completion(body: bytes, model_id: str, answer_tool: OutputTool | None) -> Completion:
    """A Converse answer as an OpenAI chat.completion."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_body("not JSON") from None
    output = data.get("output") if isinstance(data, dict) else None
    message = output.get("message") if isinstance(output, dict) else None
    blocks = message.get("content") if isinstance(message, dict) else None
    if not isinstance(blocks, list):
        raise bad_body("no output.message.content")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    answered = False
    for block in blocks:
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            texts.append(block["text"])
        use = block.get("toolUse")
        if isinstance(use, dict):
            if answer_tool is not None and use.get("name") == answer_tool.name:
                texts = [answer_tool.answer(use.get("input"))]
                answered = True
                continue
            calls.append(
                {"id": str(use.get("toolUseId")), "type": "function",
                 "function": {"name": str(use.get("name")),
                              "arguments": orjson.dumps(use.get("input") or {}).decode()}}
            )  # fmt: skip
    reason = finish_reason(data.get("stopReason"))
    if answered and not calls and reason == "tool_calls":
        reason = "stop"
    answer_message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
    }
    if calls:
        answer_message["tool_calls"] = calls
    answer: dict[str, Any] = {
        "id": f"chatcmpl-{new_id()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [
            {"index": 0, "message": answer_message, "logprobs": None, "finish_reason": reason}
        ],
    }
    counted = usage_of(data.get("usage"))
    if counted is not None:
        answer["usage"] = usage_openai(*counted)
    return Completion(answer, counted[0] if counted is not None else None)


class BedrockStreamDecoder(BlockStream):
    """ConverseStream events → OpenAI chunks.

    The opening chunk (role) waits for the first content or tool call, so that a failure
    right after `messageStart` still counts as one before the first chunk (the cascade may
    escalate from it). Text arrives as `contentBlockDelta` text without a block start; each
    `toolUse` block start is a tool call with its own OpenAI index, its input deltas the call's
    argument deltas; the output tool's deltas are content (held back until the block stops when
    its answer is wrapped). `messageStop` gives the finish_reason chunk; `metadata`, which
    follows it, the usage (and the usage chunk when the client asked for it), and ends the
    stream. Exception events fail the attempt as the same exception answered over HTTP would.
    """

    __slots__ = ("_failure",)

    def __init__(
        self,
        wants_usage: bool,
        keep_content: bool,
        answer_tool: OutputTool | None,
        model_id: str,
        failure: StreamFailure,
    ) -> None:
        super().__init__(wants_usage, keep_content, answer_tool, f"chatcmpl-{new_id()}", model_id)
        self._failure = failure

    def feed(self, event: str | None, data: bytes) -> list[bytes]:
        if event and event.startswith(("exception:", "error:")):
            raise self._failure(event.partition(":")[2], data)
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise bad_body("a stream event is not JSON") from None
        if not isinstance(payload, dict):
            raise bad_body("a stream event is not an object")
        if event == "contentBlockDelta":
            delta = payload.get("delta")
            if not isinstance(delta, dict):
                return []
            text = delta.get("text")
            if isinstance(text, str):
                return self._text(text)
            use = delta.get("toolUse")
            if not isinstance(use, dict):
                return []  # reasoning, citations
            return self._tool_input(payload.get("contentBlockIndex"), str(use.get("input") or ""))
        if event == "contentBlockStart":
            return self._start(payload)
        if event == "contentBlockStop":
            return self._block_stop(payload.get("contentBlockIndex"))
        if event == "messageStop":
            return self._emit({}, self._finish_reason(finish_reason(payload.get("stopReason"))))
        if event == "metadata":
            self.finished = True
            counted = usage_of(payload.get("usage"))
            if counted is None:
                return []
            self.usage = counted[0]
            if not self.wants_usage:
                return []
            return [self._usage_chunk(usage_openai(*counted))]
        return []  # messageStart, and event types added later

    def _start(self, payload: dict[str, Any]) -> list[bytes]:
        start = payload.get("start")
        index = payload.get("contentBlockIndex")
        use = start.get("toolUse") if isinstance(start, dict) else None
        if not isinstance(use, dict) or not isinstance(index, int):
            return []
        return self._tool_start(index, use.get("toolUseId"), use.get("name"))
