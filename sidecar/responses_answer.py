"""A chat answer as a Responses API `response` object (the translated path of `/v1/responses`).

The object echoes what the client asked for (instructions, tools, tool_choice, text.format,
sampling, metadata) as the native API does, so the official SDKs' models accept it;
`output` holds a `message` item (its `output_text`) and one `function_call` item per tool
call; a chat `finish_reason` of `length` or `content_filter` makes it `incomplete`.
"""

from __future__ import annotations

import time
from types import MappingProxyType
from typing import Any

from sidecar.ids import new_id
from sidecar.providers.base import Completion

# chat finish_reason → the Responses API's incomplete_details.reason
INCOMPLETE = MappingProxyType({"length": "max_output_tokens", "content_filter": "content_filter"})


def response_id() -> str:
    return "resp_" + new_id()


def item_id(prefix: str) -> str:
    return f"{prefix}_{new_id()}"


def response_object(
    request: dict[str, Any],
    rid: str,
    created_at: int,
    model: str,
    status: str = "in_progress",
    output: list[dict[str, Any]] | None = None,
    usage: dict[str, Any] | None = None,
    incomplete: str | None = None,
    error: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The `response` object, in any state of its life (the snapshots of a stream too);
    `usage` and `user` are left out while there are none (OpenAI's schema has them as non-null
    when present)."""
    text = request.get("text")
    spec = text.get("format") if isinstance(text, dict) else None
    data = {
        "id": rid,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete is not None else None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "metadata": request.get("metadata") or {},
        "model": model,
        "output": output or [],
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": request.get("temperature", 1.0),
        "text": {"format": spec if isinstance(spec, dict) else {"type": "text"}},
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": [_echoed_tool(tool) for tool in request.get("tools") or ()],
        "top_p": request.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": request.get("user"),
    }
    for name in ("usage", "user"):
        if data[name] is None:
            del data[name]
    return data


def _echoed_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A function tool as the native API echoes it (`strict` and `parameters` always there)."""
    if tool.get("type") != "function":
        return tool
    return {"parameters": None, "strict": True, **tool}


def message_item(
    mid: str, text: str, status: str = "completed", refusal: bool = False
) -> dict[str, Any]:
    part = (
        {"type": "refusal", "refusal": text}
        if refusal
        else {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    )
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [part],
    }


def function_call_item(
    fid: str, call_id: str, name: str, arguments: str, status: str = "completed"
) -> dict[str, Any]:
    return {
        "id": fid,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def responses_usage(chat_usage: Any) -> dict[str, Any]:
    """Chat `usage` as the Responses API counts it (cached and reasoning tokens kept)."""
    usage = chat_usage if isinstance(chat_usage, dict) else {}
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    cached = _count(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0
    reasoning = (
        _count(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, dict)
        else 0
    )
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def status_of(finish_reason: str | None) -> tuple[str, str | None]:
    """(status, incomplete_details.reason) of a chat answer that ended with `finish_reason`."""
    reason = INCOMPLETE.get(finish_reason or "")
    return ("incomplete", reason) if reason is not None else ("completed", None)


def from_completion(request: dict[str, Any], completion: Completion) -> dict[str, Any]:
    """The `response` object of a translated request's chat answer (its first choice)."""
    body = completion.body
    message = completion.message
    output: list[dict[str, Any]] = []
    status, incomplete = status_of(completion.finish_reason)
    content = message.get("content")
    refusal = message.get("refusal")
    if isinstance(content, str) and content:
        output.append(message_item(item_id("msg"), content, _item_status(status)))
    elif isinstance(refusal, str) and refusal:
        output.append(message_item(item_id("msg"), refusal, _item_status(status), refusal=True))
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        arguments = function.get("arguments")
        output.append(
            function_call_item(
                item_id("fc"),
                str(call.get("id") or item_id("call")),
                str(function.get("name") or ""),
                arguments if isinstance(arguments, str) else "{}",
            )
        )
    usage = body.get("usage")
    if not isinstance(usage, dict) and completion.usage is not None:
        usage = completion.usage.as_openai()
    created = body.get("created")
    return response_object(
        request,
        response_id(),
        created if isinstance(created, int) else int(time.time()),
        str(body.get("model") or request.get("model")),
        status,
        output,
        responses_usage(usage),
        incomplete,
    )


def _item_status(status: str) -> str:
    return "incomplete" if status == "incomplete" else "completed"
