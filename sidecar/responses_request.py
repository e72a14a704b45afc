"""A Responses API request (`POST /v1/responses`): its checks, and its translation onto chat.

`check` answers a 400 naming the first malformed parameter, whichever provider will answer.
`to_chat` builds the chat completions request a provider without the native Responses API is
sent (input items → messages, `instructions` → a system message first, function tools and
calls, `text.format` → `response_format`, `max_output_tokens` → `max_completion_tokens`), and
names the first parameter that only a native provider can take (server-side state, built-in
tools, stored items): a candidate without the native API is refused for it before any call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sidecar.errors import invalid_request

MESSAGE_ROLES = frozenset({"user", "system", "developer", "assistant"})
FORMAT_TYPES = frozenset({"text", "json_object", "json_schema"})
CHOICE_MODES = frozenset({"none", "auto", "required"})
# the server-side state the native API keeps and a chat call cannot: (parameter, when it
# asks for it, what it asks)
STATEFUL: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("previous_response_id", lambda value: value is not None, "continues a stored response"),
    ("conversation", lambda value: value is not None, "continues a stored conversation"),
    ("store", lambda value: value is True, "asks for the response to be stored"),
    ("background", lambda value: value is True, "asks for a response run in the background"),
    ("prompt", lambda value: value is not None, "names a stored prompt template"),
)


@dataclass(slots=True)
class ResponsesCall:
    """A Responses request as the cascade sends it: as the client sent it (`request`, for a
    provider with the native API), as a chat request (`chat`, for the others), and the first
    parameter (with why) that only the native API takes: then `chat` is incomplete and a
    candidate without the native API is refused before any call."""

    request: dict[str, Any]
    chat: dict[str, Any]
    native_only: tuple[str, str] | None = None


def _number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise invalid_request(f"{name} must be a number between {low} and {high}", name)


def _string(value: Any, name: str, rule: str = "a string") -> None:
    if value is not None and not isinstance(value, str):
        raise invalid_request(f"{name} must be {rule}", name)


def check(body: dict[str, Any]) -> None:
    """Raise a 400 GatewayError for the first malformed parameter of a Responses request."""
    model = body.get("model")
    if model is None:
        raise invalid_request("model is required (e.g. fc:openai/gpt-4o-mini)", "model")
    if not isinstance(model, str) and not (
        isinstance(model, list) and model and all(isinstance(m, str) for m in model)
    ):
        raise invalid_request("model must be a model ref (or an array of them)", "model")
    continues = body.get("previous_response_id") is not None or body.get("conversation") is not None
    _input(body.get("input"), continues)
    _string(body.get("instructions"), "instructions")
    for name in ("stream", "parallel_tool_calls", "store", "background"):
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise invalid_request(f"{name} must be true or false", name)
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    cap = body.get("max_output_tokens")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise invalid_request("max_output_tokens must be a positive integer", "max_output_tokens")
    _tools(body.get("tools"))
    _tool_choice(body.get("tool_choice"))
    _text(body.get("text"))
    metadata = body.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise invalid_request("metadata must be an object of string values", "metadata")
    for name in ("user", "previous_response_id", "safety_identifier", "prompt_cache_key"):
        _string(body.get(name), name)
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise invalid_request("reasoning must be an object", "reasoning")
        for name in ("effort", "summary", "generate_summary"):
            _string(reasoning.get(name), f"reasoning.{name}")
    _string(body.get("truncation"), "truncation", 'a string ("auto" or "disabled")')
    include = body.get("include")
    if include is not None and (
        not isinstance(include, list) or not all(isinstance(item, str) for item in include)
    ):
        raise invalid_request("include must be an array of strings", "include")


def _input(value: Any, continues: bool) -> None:
    if value is None:
        if continues:
            return  # the stored conversation goes on (native only)
        raise invalid_request("input is required: a string or an array of input items", "input")
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not (value or continues):
        raise invalid_request("input must be a string or a non-empty array of input items", "input")
    for index, item in enumerate(value):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise invalid_request(f"{where} must be an input item object", where)
        kind = item.get("type", "message")
        if kind == "message":
            _message(item, where)
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if not isinstance(item.get(name), str):
                    raise invalid_request(
                        f"{where}.{name} must be a string (a function_call item)", f"{where}.{name}"
                    )
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise invalid_request(
                    f"{where}.call_id must be a string (a function_call_output item)",
                    f"{where}.call_id",
                )
            output = item.get("output")
            if not isinstance(output, str | list):
                raise invalid_request(
                    f"{where}.output must be a string or an array of content parts",
                    f"{where}.output",
                )
        elif not isinstance(kind, str):
            raise invalid_request(f"{where}.type must be a string", f"{where}.type")


def _message(item: dict[str, Any], where: str) -> None:
    role = item.get("role")
    if not isinstance(role, str) or role not in MESSAGE_ROLES:  # a list or object: unhashable
        raise invalid_request(
            f"{where}.role must be one of user, system, developer, assistant; got {role!r}",
            f"{where}.role",
        )
    content = item.get("content")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise invalid_request(
            f"{where}.content must be a string or an array of content parts", f"{where}.content"
        )
    for index, part in enumerate(content):
        at = f"{where}.content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise invalid_request(f"{at} must be an object with a type", at)
        if kind in ("input_text", "output_text") and not isinstance(part.get("text"), str):
            raise invalid_request(f"{at}.text must be a string (an {kind} part)", f"{at}.text")
        if kind == "input_image" and not isinstance(
            part.get("image_url") or part.get("file_id"), str
        ):
            raise invalid_request(
                f"{at} must have an image_url (or a file_id) string (an input_image part)", at
            )


def _tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise invalid_request("tools must be an array of tool objects", "tools")
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if not isinstance(kind, str):
            raise invalid_request(f"{where} must be an object with a type", where)
        if kind == "function":
            if not isinstance(tool.get("name"), str) or not tool["name"]:
                raise invalid_request(f"{where}.name must be a non-empty string", f"{where}.name")
            parameters = tool.get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise invalid_request(
                    f"{where}.parameters must be a JSON Schema object", f"{where}.parameters"
                )
            strict = tool.get("strict")
            if strict is not None and not isinstance(strict, bool):
                raise invalid_request(f"{where}.strict must be true or false", f"{where}.strict")


def _tool_choice(choice: Any) -> None:
    if choice is None or (isinstance(choice, str) and choice in CHOICE_MODES):
        return
    if not isinstance(choice, dict) or not isinstance(choice.get("type"), str):
        raise invalid_request(
            "tool_choice must be none, auto, required or an object with a type", "tool_choice"
        )
    if choice["type"] == "function" and not isinstance(choice.get("name"), str):
        raise invalid_request(
            "tool_choice {type: function} needs the function's name", "tool_choice"
        )


def _text(text: Any) -> None:
    if text is None:
        return
    if not isinstance(text, dict):
        raise invalid_request("text must be an object ({format: {type: ...}})", "text")
    spec = text.get("format")
    if spec is None:
        return
    kind = spec.get("type") if isinstance(spec, dict) else None
    if not isinstance(kind, str) or kind not in FORMAT_TYPES:  # a list or object: unhashable
        raise invalid_request(
            "text.format must be {type: text | json_object | json_schema}", "text.format"
        )
    if kind != "json_schema":
        return
    assert isinstance(spec, dict)
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise invalid_request("text.format.name is required for json_schema", "text.format.name")
    if not isinstance(spec.get("schema"), dict):
        raise invalid_request(
            "text.format.schema must be a JSON Schema object", "text.format.schema"
        )
    if not isinstance(spec.get("strict", False), bool | None):
        raise invalid_request("text.format.strict must be true or false", "text.format.strict")


def to_chat(body: dict[str, Any]) -> ResponsesCall:
    """The chat completions request of a checked Responses request (`check` first)."""
    native_only: tuple[str, str] | None = None
    for name, asks, what in STATEFUL:
        if asks(body.get(name)):
            native_only = (name, f"{what}: server-side state, kept only by the native API")
            break
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list):
        for index, item in enumerate(given):
            refused = _add_item(messages, item, f"input[{index}]")
            if refused is not None and native_only is None:
                native_only = refused
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    tools, refused = _chat_tools(body.get("tools"))
    if refused is not None and native_only is None:
        native_only = refused
    if tools:
        chat["tools"] = tools
    choice, refused = _chat_tool_choice(body.get("tool_choice"))
    if refused is not None and native_only is None:
        native_only = refused
    if choice is not None and tools:
        chat["tool_choice"] = choice
    if tools and isinstance(body.get("parallel_tool_calls"), bool):
        chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    for name in ("temperature", "top_p", "user"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # for response.completed's usage
    return ResponsesCall(body, chat, native_only)


def _add_item(
    messages: list[dict[str, Any]], item: dict[str, Any], where: str
) -> tuple[str, str] | None:
    """Append one input item as chat messages; what only the native API takes, if it is that."""
    kind = item.get("type", "message")
    if kind == "message":
        content, refused = _content(item["content"], where)
        messages.append({"role": item["role"], "content": content})
        return refused
    if kind == "function_call":
        call = {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)  # one turn: its text and its calls
            if last.get("content") == "":
                last["content"] = None
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        return None
    if kind == "function_call_output":
        output = item["output"]
        if isinstance(output, list):
            output = "".join(part.get("text", "") for part in output if isinstance(part, dict))
        messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        return None
    if kind == "reasoning":
        return None  # a model's own reasoning: no chat provider takes it back
    return (where, f"is an item of type {kind}, which only the native API takes")


def _content(content: Any, where: str) -> tuple[Any, tuple[str, str] | None]:
    """A message's content as chat content: a string as it is, parts translated."""
    if isinstance(content, str):
        return content, None
    parts: list[dict[str, Any]] = []
    refused: tuple[str, str] | None = None
    for index, part in enumerate(content):
        kind = part["type"]
        if kind in ("input_text", "output_text"):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image: dict[str, Any] = {"url": part["image_url"]}
            if isinstance(part.get("detail"), str):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "input_file" and isinstance(part.get("file_data"), str):
            file = {"file_data": part["file_data"]}
            if isinstance(part.get("filename"), str):
                file["filename"] = part["filename"]
            parts.append({"type": "file", "file": file})  # inline: chat's file part
        elif refused is None:
            what = "an input_image by file_id" if kind == "input_image" else f"an {kind} part"
            if kind == "input_file":
                what = "an input_file by file_id or file_url"
            refused = (
                f"{where}.content[{index}]",
                f"is {what}, which only the native API reads (files it stores or fetches)",
            )
    if all(part["type"] == "text" for part in parts):  # plain text: the form every kind takes
        return "".join(part["text"] for part in parts), refused
    return parts, refused


def _chat_tools(tools: Any) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
    chat_tools: list[dict[str, Any]] = []
    refused: tuple[str, str] | None = None
    for index, tool in enumerate(tools or ()):
        if tool["type"] != "function":
            if refused is None:
                refused = (
                    f"tools[{index}]",
                    f"is the built-in tool {tool['type']}, which runs only with the native API "
                    "(function tools are translated)",
                )
            continue
        function: dict[str, Any] = {"name": tool["name"]}
        for name in ("description", "parameters", "strict"):
            if tool.get(name) is not None:
                function[name] = tool[name]
        chat_tools.append({"type": "function", "function": function})
    return chat_tools, refused


def _chat_tool_choice(choice: Any) -> tuple[Any, tuple[str, str] | None]:
    if choice is None or isinstance(choice, str):
        return choice, None
    if choice["type"] == "function":
        return {"type": "function", "function": {"name": choice["name"]}}, None
    if choice["type"] == "allowed_tools" and choice.get("mode") in CHOICE_MODES:
        return choice["mode"], None  # every translated tool stays allowed: the mode is kept
    return None, (
        "tool_choice",
        f"names the built-in tool {choice['type']}, which runs only with the native API",
    )


def chat_response_format(text: Any) -> dict[str, Any] | None:
    """The chat `response_format` a Responses request's `text` becomes; None for text, or
    when `text` is not well formed (the request's checks say why)."""
    try:
        return _response_format(text)
    except (KeyError, TypeError):
        return None


def _response_format(text: Any) -> dict[str, Any] | None:
    spec = text.get("format") if isinstance(text, dict) else None
    if not isinstance(spec, dict) or spec.get("type") == "text":
        return None
    if spec["type"] == "json_object":
        return {"type": "json_object"}
    json_schema = {"name": spec["name"], "schema": spec["schema"]}
    for name in ("description", "strict"):
        if spec.get(name) is not None:
            json_schema[name] = spec[name]
    return {"type": "json_schema", "json_schema": json_schema}
