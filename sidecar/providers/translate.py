"""What every native adapter's request translation needs alike: reading OpenAI content and
numbers, base64 data URLs, and the 400 for what a provider's API cannot take."""

from __future__ import annotations

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
