"""Structured output on a streamed request (SPEC 2.3): a natively streamed answer is validated
at its end (a failure becomes an SSE error event), and an answer the re-prompt loop of
`sidecar.structured` produced buffered is sent as OpenAI chunks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from sidecar.errors import GatewayError
from sidecar.providers.base import Completion
from sidecar.structured import summary

if TYPE_CHECKING:
    from sidecar.flow import Flow
    from sidecar.routing import Candidate
    from sidecar.schema_check import SchemaPlan


def streamed_failure(
    flow: Flow, candidate: Candidate, plan: SchemaPlan, content: str, tool_calls: bool
) -> GatewayError | None:
    """Validate a natively streamed answer at its end; the 422 to send as an SSE event, if any."""
    flow.schema_enforced = True
    if tool_calls:
        return None
    verdict = plan.check(content)
    flow.schema_checks.append((candidate.label, "valid" if verdict.ok else "invalid"))
    if verdict.ok:
        return None
    return schema_failed(
        f"the streamed answer does not match response_format: {summary(verdict.problems)}"
    )


def mentions_tool_calls(chunks: list[bytes]) -> bool:
    """Whether streamed chunks carry tool calls (a key, never escaped text inside content)."""
    return any(b'"tool_calls":' in c or b'"finish_reason":"tool_calls"' in c for c in chunks)


def schema_failed(message: str) -> GatewayError:
    return GatewayError(422, "response_schema_validation_failed", message, param="response_format")


def completion_chunks(completion: Completion, include_usage: bool) -> list[bytes]:
    """A buffered answer as OpenAI `chat.completion.chunk` payloads (without `[DONE]`)."""
    body = completion.body
    base: dict[str, Any] = {
        "id": body.get("id", "chatcmpl-ringside"),
        "object": "chat.completion.chunk",
        "created": body.get("created", 0),
        "model": body.get("model"),
    }
    if "system_fingerprint" in body:
        base["system_fingerprint"] = body["system_fingerprint"]
    if include_usage:
        base["usage"] = None
    chunks: list[bytes] = []

    def add(index: int, delta: dict[str, Any], finish: str | None) -> None:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        chunks.append(orjson.dumps({**base, "choices": [choice]}))

    for position, choice in enumerate(body.get("choices") or ()):
        index = choice.get("index", position)
        message = choice.get("message") or {}
        add(index, {"role": "assistant", "content": ""}, None)
        content = message.get("content")
        if isinstance(content, str) and content:
            add(index, {"content": content}, None)
        tool_calls = message.get("tool_calls")
        if isinstance(tool_calls, list) and tool_calls:
            calls = [{"index": i, **call} for i, call in enumerate(tool_calls)]
            add(index, {"tool_calls": calls}, None)
        add(index, {}, choice.get("finish_reason") or "stop")
    if include_usage:
        usage = body.get("usage")
        if usage is None and completion.usage is not None:
            usage = completion.usage.as_openai()
        chunks.append(orjson.dumps({**base, "choices": [], "usage": usage}))
    return chunks
