"""OpenAI chat request → Cohere v2 Chat request (pure translation).

What is translated, what is dropped and what is refused:
- messages keep their order and roles (`developer` is sent as `system`); content is a string or
  parts: text, and images as `image_url` parts (data URLs or https URLs, `detail` kept), which
  v2 takes as OpenAI sends them; audio and file parts are refused (400);
- an assistant turn's `tool_calls` go as they are (id, function name, arguments string), its
  text beside them as `tool_plan` (what Cohere answers beside tool calls); a `tool` turn keeps
  its `tool_call_id`;
- `tools` (function tools only) go as they are; `tool_choice`: `required` → `REQUIRED`, `none`
  → `NONE`, `auto` → left out; a named function (which v2 has no form for) → `REQUIRED` with
  only that tool sent; `allowed_tools` → those tools, `REQUIRED` when its mode says so;
- `response_format` json_schema → `{type: json_object, json_schema: <schema>}` (a schema whose
  top level is no object, which v2 cannot take, and any format beside `tools`, which v2 refuses,
  go as a system instruction instead); json_object → `{type: json_object}`;
- `max_completion_tokens` / `max_tokens` → `max_tokens` (the smaller when both, and at most the
  catalog's `max_output` for the model: v2 refuses more than the model's limit); `stop` →
  `stop_sequences`; `temperature` and `seed` as they are; `top_p` → `p` (v2 takes 0.01–0.99:
  1 goes as 0.99); `top_k` → `k`; `frequency_penalty` / `presence_penalty` above 0 → the same,
  at most 1 (v2's range is 0–1; OpenAI's negative values, which favour repetition, have no v2
  counterpart and are dropped);
- `n > 1` is refused (400, naming the provider); every other OpenAI parameter (`user`,
  `metadata`, `logprobs`, `logit_bias`, `parallel_tool_calls`, a function's `strict`,
  `service_tier`, `store`, …) is dropped.
"""

from __future__ import annotations

from typing import Any

import orjson

from sidecar.errors import UpstreamError
from sidecar.providers.translate import (
    assistant_text,
    is_number,
    one_choice,
    tool_choice_of,
    unsupported,
)
from sidecar.schema_check import format_instruction

IMAGE_DETAILS = frozenset({"auto", "low", "high"})
P_RANGE = (0.01, 0.99)  # v2's bounds of `p`
K_MAX = 500


def refused(provider: str, message: str, param: str) -> UpstreamError:
    return unsupported(provider, "Cohere v2 Chat API", message, param)


def chat_body(
    body: dict[str, Any], model_id: str, stream: bool, provider: str, max_output: int | None = None
) -> dict[str, Any]:
    """The v2 Chat body for an OpenAI chat body (see the module's docstring)."""
    one_choice(body, provider, refused)
    messages = _messages(body.get("messages"), provider)
    out: dict[str, Any] = {"model": model_id, "messages": messages, "stream": stream}
    _sampling(body, out, max_output)
    tools = _tools(body, out, provider)
    _response_format(body.get("response_format"), out, tools)
    return out


def _sampling(body: dict[str, Any], out: dict[str, Any], max_output: int | None) -> None:
    caps = [
        body[name]
        for name in ("max_completion_tokens", "max_tokens")
        if isinstance(body.get(name), int) and not isinstance(body[name], bool) and body[name] > 0
    ]
    if caps and max_output:  # the model's own limit: v2 refuses more ("too many tokens")
        caps.append(max_output)
    if caps:
        out["max_tokens"] = min(caps)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list) and stop and all(isinstance(s, str) for s in stop):
        out["stop_sequences"] = stop
    if is_number(body.get("temperature")):
        out["temperature"] = max(0, body["temperature"])
    if is_number(body.get("top_p")):
        out["p"] = min(max(body["top_p"], P_RANGE[0]), P_RANGE[1])
    top_k = body.get("top_k")
    if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0:
        out["k"] = min(top_k, K_MAX)
    if isinstance(body.get("seed"), int) and not isinstance(body["seed"], bool):
        out["seed"] = body["seed"]
    for name in ("frequency_penalty", "presence_penalty"):
        value = body.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            out[name] = min(value, 1)


# -- messages --------------------------------------------------------------------------------


def _messages(messages: Any, provider: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise refused(provider, "needs at least one message", "messages")
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            out.append({"role": "system", "content": _text_content(message, provider, where)})
        elif role == "user":
            out.append({"role": "user", "content": _user_content(message, provider, where)})
        elif role == "assistant":
            turn = _assistant(message, provider, where)
            if turn is not None:
                out.append(turn)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise refused(provider, "needs tool_call_id on a tool message", where)
            content = _text_content(message, provider, where)
            out.append({"role": "tool", "tool_call_id": call_id, "content": content})
        else:
            raise refused(
                provider, f"cannot translate role {role!r}: send tool results as role tool",
                f"{where}.role",
            )  # fmt: skip
    return out


def _parts(content: Any) -> list[Any]:
    return content if isinstance(content, list) else []


def _text_content(message: dict[str, Any], provider: str, where: str) -> str | list[Any]:
    """System and tool content: a string, or text parts (anything else is refused)."""
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(_parts(content)):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else part
            raise refused(
                provider, f"takes only text in this message, not a {kind!r} part",
                f"{where}.content[{index}]",
            )  # fmt: skip
        parts.append({"type": "text", "text": str(part.get("text") or "")})
    return parts


def _user_content(message: dict[str, Any], provider: str, where: str) -> str | list[Any]:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(_parts(content)):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(part.get("text") or "")})
        elif kind == "image_url":
            parts.append(_image(part.get("image_url"), provider, f"{where}.content[{index}]"))
        else:
            raise refused(
                provider, f"takes text and image_url parts, not {kind!r} (audio and files "
                "have no v2 Chat form)", f"{where}.content[{index}]",
            )  # fmt: skip
    return parts


def _image(image: Any, provider: str, where: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url.startswith(("data:image/", "https://", "http://")):
        raise refused(provider, "takes images as data URLs or http(s) URLs", f"{where}.image_url")
    translated: dict[str, Any] = {"url": url}
    detail = image.get("detail") if isinstance(image, dict) else None
    if detail in IMAGE_DETAILS:
        translated["detail"] = detail
    return {"type": "image_url", "image_url": translated}


def _assistant(message: dict[str, Any], provider: str, where: str) -> dict[str, Any] | None:
    text = assistant_text(message.get("content"))
    calls = message.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        return {"role": "assistant", "content": text} if text else None
    translated = []
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(call.get("id"), str):
            raise refused(
                provider, "needs tool calls with an id and a function",
                f"{where}.tool_calls[{index}]",
            )  # fmt: skip
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = orjson.dumps(arguments if arguments is not None else {}).decode()
        translated.append(
            {"id": call["id"], "type": "function",
             "function": {"name": str(function.get("name") or ""), "arguments": arguments}}
        )  # fmt: skip
    turn: dict[str, Any] = {"role": "assistant", "tool_calls": translated}
    if text:
        turn["tool_plan"] = text
    return turn


# -- tools and response formats --------------------------------------------------------------


def _tools(body: dict[str, Any], out: dict[str, Any], provider: str) -> bool:
    """`tools` and `tool_choice` into `out`; whether any tool is sent."""
    given = body.get("tools")
    tools: list[dict[str, Any]] = []
    for index, tool in enumerate(given if isinstance(given, list) else ()):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function":
            raise refused(provider, "takes only function tools", f"tools[{index}]")
        parameters = function.get("parameters")
        translated: dict[str, Any] = {
            "name": function.get("name"),
            "parameters": (
                parameters if isinstance(parameters, dict) else {"type": "object", "properties": {}}
            ),
        }
        if isinstance(function.get("description"), str):
            translated["description"] = function["description"]
        tools.append({"type": "function", "function": translated})
    if not tools:
        return False
    choice, only = _tool_choice(body.get("tool_choice"), provider)
    if only is not None:
        kept = [tool for tool in tools if tool["function"]["name"] in only]
        if not kept:
            raise refused(
                provider, f"was asked to call {sorted(only)}, which are not among the tools",
                "tool_choice",
            )  # fmt: skip
        tools = kept
    out["tools"] = tools
    if choice is not None:
        out["tool_choice"] = choice
    return True


def _tool_choice(choice: Any, provider: str) -> tuple[str | None, set[str] | None]:
    """(v2 tool_choice or None for auto, the tool names to send or None for all)."""
    kind, detail = tool_choice_of(choice, provider, refused)
    if kind == "function":
        return "REQUIRED", {detail}
    if kind == "allowed_tools":
        allowed = detail if isinstance(detail, dict) else {}
        names = {
            str((tool.get("function") or {}).get("name") or tool.get("name"))
            for tool in allowed.get("tools") or ()
            if isinstance(tool, dict)
        }
        return ("REQUIRED" if allowed.get("mode") == "required" else None), names or None
    return {"required": "REQUIRED", "none": "NONE"}.get(kind), None


def _response_format(response_format: Any, out: dict[str, Any], tools: bool) -> None:
    if not isinstance(response_format, dict):
        return
    kind = response_format.get("type")
    if kind not in ("json_object", "json_schema"):
        return  # text: v2's default
    schema: Any = None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        schema = schema if isinstance(schema, dict) else {}
    if tools or (schema is not None and not _object_schema(schema)):
        # v2 refuses response_format beside tools, and takes only object schemas: the format
        # is asked for in words, and checked by the core as always (SPEC 2.3)
        messages = out["messages"]
        at = 0
        while at < len(messages) and messages[at]["role"] == "system":
            at += 1
        messages.insert(at, {"role": "system", "content": format_instruction(response_format)})
        return
    translated: dict[str, Any] = {"type": "json_object"}
    if schema is not None:
        translated["json_schema"] = schema
    out["response_format"] = translated


def _object_schema(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    return kind == "object" or (kind is None and "properties" in schema)
