"""Checks of a chat request's parameters: a 400 naming the parameter, never a 500 later.

Only what the OpenAI API defines is checked; unknown parameters pass through untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from itertools import islice
from typing import Any

from sidecar.errors import GatewayError, invalid_request

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
RESPONSE_FORMAT_TYPES = frozenset({"text", "json_object", "json_schema"})


def _number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_request(f"{name} must be a number between {low} and {high}", name)
    if not low <= value <= high:
        raise invalid_request(f"{name} must be between {low} and {high}, got {value}", name)


def _integer(body: dict[str, Any], name: str, low: int, high: int | None = None) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_request(f"{name} must be an integer", name)
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise invalid_request(f"{name} must be {bound}, got {value}", name)


def _boolean(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid_request(f"{name} must be true or false", name)


def _messages(messages: Any, start: int = 0, stop: int | None = None) -> None:
    """Check `messages[start:stop]` (all of them by default)."""
    if not isinstance(messages, list) or not messages:
        raise invalid_request("messages must be a non-empty array of message objects", "messages")
    batch = messages if start == 0 and stop is None else islice(messages, start, stop)
    for index, message in enumerate(batch, start):
        if not isinstance(message, dict):
            where = f"messages[{index}]"
            raise invalid_request(f"{where} must be an object with role and content", where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            where = f"messages[{index}]"
            raise invalid_request(
                f"{where}.role must be one of system, developer, user, assistant, tool; "
                f"got {role!r}",
                f"{where}.role",
            )
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            where = f"messages[{index}]"
            raise invalid_request(
                f"{where}.tool_call_id is required for role tool", f"{where}.tool_call_id"
            )
        content = message.get("content")
        if isinstance(content, str):
            continue
        where = f"messages[{index}]"
        if content is None:
            if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
                continue
            raise invalid_request(f"{where}.content is required", f"{where}.content")
        if not isinstance(content, list):
            raise invalid_request(
                f"{where}.content must be a string or an array of content parts",
                f"{where}.content",
            )
        for part_index, part in enumerate(content):
            _content_part(part, f"{where}.content[{part_index}]")


# What each content part type of the OpenAI API carries: (field, its type, how to say it).
# Part types not listed here pass through untouched, as unknown parameters do.
_PART_FIELDS: dict[str, tuple[str, type, str]] = {
    "text": ("text", str, "a string"),
    "refusal": ("refusal", str, "a string"),
    "image_url": ("image_url", dict, "an object with a url"),
    "input_audio": ("input_audio", dict, "an object with data and format"),
    "file": ("file", dict, "an object"),
}


def _content_part(part: Any, where: str) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if not isinstance(kind, str):
        raise invalid_request(f"{where} must be an object with a type", where)
    expected = _PART_FIELDS.get(kind)
    if expected is None:
        return
    field, of_type, rule = expected
    if not isinstance(part.get(field), of_type) or (
        kind == "image_url" and not isinstance(part[field].get("url"), str)
    ):
        raise invalid_request(f"{where}.{field} must be {rule} (a {kind} part)", f"{where}.{field}")


def schema_format(value: Any) -> dict[str, Any] | None:
    """`value` if it is a well-formed json_schema `response_format` (what is worth compiling
    before the request's other checks: `SchemaCache.prime`), else None."""
    if not isinstance(value, dict) or value.get("type") != "json_schema":
        return None
    try:
        _response_format(value)
    except GatewayError:
        return None
    return value


def _response_format(value: Any) -> None:
    if value is None:
        return
    kind = value.get("type") if isinstance(value, dict) else None
    if not isinstance(kind, str) or kind not in RESPONSE_FORMAT_TYPES:
        raise invalid_request(
            "response_format must be {type: text | json_object | json_schema}", "response_format"
        )
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise invalid_request(
                "response_format.json_schema must be an object with a name and a schema",
                "response_format",
            )
        schema = spec.get("schema", {})
        if not isinstance(schema, dict | bool):
            raise invalid_request(
                "response_format.json_schema.schema must be a JSON Schema object",
                "response_format",
            )
        if not isinstance(spec.get("strict", False), bool | None):
            raise invalid_request(
                "response_format.json_schema.strict must be true or false", "response_format"
            )


def _stream_options(body: dict[str, Any], _name: str) -> None:
    options = body["stream_options"]
    if options is None:
        return
    if not isinstance(options, dict):
        raise invalid_request("stream_options must be an object", "stream_options")
    _boolean(options, "include_usage")


def _stop(body: dict[str, Any], _name: str) -> None:
    stop = body["stop"]
    if (
        stop is not None
        and not isinstance(stop, str)
        and (
            not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop)
        )
    ):
        raise invalid_request("stop must be a string or an array of up to 4 strings", "stop")


def _tools(body: dict[str, Any], _name: str) -> None:
    tools = body["tools"]
    if tools is not None and (
        not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)
    ):
        raise invalid_request("tools must be an array of tool objects", "tools")


def _of_type(kind: type | tuple[type, ...], rule: str) -> Callable[[dict[str, Any], str], None]:
    def check(body: dict[str, Any], name: str) -> None:
        value = body[name]
        if value is not None and not isinstance(value, kind):
            raise invalid_request(f"{name} must be {rule}", name)

    return check


# Each parameter's check, in the order errors are reported; only parameters present are looked
# at (a typical request sends three or four of them).
_CHECKS: tuple[tuple[str, Callable[[dict[str, Any], str], None]], ...] = (
    ("messages", lambda body, _: _messages(body["messages"])),
    ("stream", _boolean),
    ("stream_options", _stream_options),
    ("temperature", lambda body, name: _number(body, name, 0, 2)),
    ("top_p", lambda body, name: _number(body, name, 0, 1)),
    ("presence_penalty", lambda body, name: _number(body, name, -2, 2)),
    ("frequency_penalty", lambda body, name: _number(body, name, -2, 2)),
    ("max_tokens", lambda body, name: _integer(body, name, 1)),
    ("max_completion_tokens", lambda body, name: _integer(body, name, 1)),
    ("n", lambda body, name: _integer(body, name, 1, 128)),
    ("seed", lambda body, name: _integer(body, name, -(2**63), 2**63 - 1)),
    ("parallel_tool_calls", _boolean),
    ("stop", _stop),
    ("tools", _tools),
    ("tool_choice", _of_type((str, dict), "a string or an object")),
    ("response_format", lambda body, _: _response_format(body["response_format"])),
    ("user", _of_type(str, "a string")),
    ("metadata", _of_type(dict, "an object of string values")),
)  # fmt: skip


_CHECKS_BUT_MESSAGES = _CHECKS[1:]
_MESSAGES_BATCH = 128  # checked between two looks at the clock (~20-40 µs)


def validate_chat_request(body: dict[str, Any], messages_checked: bool = False) -> None:
    """Raise a 400 GatewayError for the first malformed parameter; `messages_checked`: by
    `check_messages_ahead`, which found them well formed."""
    if "model" not in body:
        raise invalid_request("model is required (e.g. fc:openai/gpt-4o-mini)", "model")
    if "messages" not in body:
        _messages(None)
    for name, check in _CHECKS_BUT_MESSAGES if messages_checked else _CHECKS:
        if name in body:
            check(body, name)


async def check_messages_ahead(body: dict[str, Any], pace: Callable[[], Awaitable[None]]) -> bool:
    """Check a large body's messages `_MESSAGES_BATCH` at a time, `pace` awaited between
    batches (it lets the loop turn when the check has held it long enough): ~0.15-0.3 µs a
    message, so 100,000 of them were one step of 15-30 ms in `validate_chat_request`. The
    first malformed one is the same 400; True when all are well formed (the rest of the
    checks then skip them), False when there is nothing to check ahead."""
    messages = body.get("messages")
    if "model" not in body or not isinstance(messages, list) or not messages:
        return False  # validate_chat_request answers, in its order
    for start in range(0, len(messages), _MESSAGES_BATCH):
        _messages(messages, start, start + _MESSAGES_BATCH)
        await pace()
    return True


def requested_max_output(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    return value if isinstance(value, int) else None


def header_error(name: str, rule: str) -> GatewayError:
    return GatewayError(400, "invalid_request", f"header {name} {rule}", param=name)
