"""What every native adapter's request translation needs alike: reading OpenAI content and
numbers, base64 data URLs, and the 400 for what a provider's API cannot take."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeGuard

from sidecar.errors import GatewayError, Outcome, UpstreamError


def unsupported(provider: str, api: str, message: str, param: str) -> UpstreamError:
    """A request this provider cannot take: the client's fault, answered as a 400 at once,
    naming the provider and its API (`api`: e.g. "Anthropic Messages API")."""
    text = f"provider {provider!r} ({api}) {message}"
    error = GatewayError(400, "invalid_request", text, param=param)
    return UpstreamError(
        Outcome.CLIENT_FAULT, text, status=400, reason="unsupported", client_error=error
    )


def text_of(content: Any) -> str:
    """An OpenAI message's text: the string, or its text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (JSON's true is Python's 1)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a base64 data URL, else None."""
    head, comma, data = url.partition(",")
    if not comma or not head.startswith("data:") or not head.endswith(";base64"):
        return None
    return head[5:-7].split(";")[0].lower(), data


# a message's turn: (the provider's role for it, its blocks), from (role, message, where)
TurnOf = Callable[[str, dict[str, Any], str], tuple[str, list[dict[str, Any]]]]


def merged_turns(
    messages: list[Any], turn_of: TurnOf, blocks_key: str = "content"
) -> tuple[list[str], list[dict[str, Any]]]:
    """(system texts, turns) of OpenAI `messages` for an API that keeps the system prompt apart
    and wants turns that alternate: system and developer messages give their text; every other
    message is `turn_of(role, message, "messages[i]")` (which raises for what it cannot
    translate), and consecutive turns of one provider role are merged into one."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role in ("system", "developer"):
            text = text_of(message.get("content"))
            if text:
                system.append(text)
            continue
        role, blocks = turn_of(str(role), message, f"messages[{index}]")
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1][blocks_key].extend(blocks)
        else:
            turns.append({"role": role, blocks_key: blocks})
    return system, turns
