"""What every native adapter's request translation needs alike: reading OpenAI content and
numbers, base64 data URLs, assistant tool calls and tool_choice, and the 400 for what a
provider's API cannot take."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeGuard

import orjson

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


# a provider's 400 for what its API cannot take: refused(provider, message, param)
Refuse = Callable[[str, str, str], UpstreamError]
# a message's blocks: (its content or the message, provider, "messages[i]")
Blocks = Callable[[Any, str, str], list[dict[str, Any]]]


def tool_results_as_user(
    provider: str,
    refused: Refuse,
    user_blocks: Blocks,
    assistant_blocks: Blocks,
    tool_result: Callable[[dict[str, Any]], dict[str, Any]],
) -> TurnOf:
    """`turn_of` for an API whose tool results are blocks of a user turn (Anthropic Messages,
    Bedrock Converse): user and assistant messages by their block builders, a tool message a
    user turn holding its result; any other role refused, naming `messages[i].role`."""

    def turn_of(role: str, message: dict[str, Any], where: str) -> tuple[str, list[Any]]:
        if role == "user":
            return role, user_blocks(message.get("content"), provider, where)
        if role == "assistant":
            return role, assistant_blocks(message, provider, where)
        if role == "tool":
            return "user", [tool_result(message)]
        raise refused(
            provider, f"cannot translate role {role!r}: send tool results as role tool",
            f"{where}.role",
        )  # fmt: skip

    return turn_of


def one_choice(body: Mapping[str, Any], provider: str, refused: Refuse) -> None:
    """Refuses `n` above 1, for an API that answers one choice per call."""
    n = body.get("n")
    if is_int(n) and n > 1:
        raise refused(
            provider, f"returns one choice per call: n={n} is not supported; send n=1 (or "
            "leave it out) and make several calls, or route to a provider that takes n", "n",
        )  # fmt: skip


def assistant_text(content: Any) -> str:
    """An assistant message's text: the string, or its text and refusal parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text") or part.get("refusal") or "")
            for part in content
            if isinstance(part, dict)
        )
    return ""


def tool_calls(
    calls: Any, provider: str, refused: Refuse, where: str
) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(call, its function, its arguments) of each of an assistant message's `tool_calls`
    (`where`: "messages[i]"), in order; a call without a function, or whose arguments are not
    a JSON object, is refused when it is reached (no arguments: `{}`)."""
    for index, call in enumerate(calls if isinstance(calls, list) else ()):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise refused(provider, "needs tool calls with a function", f"{where}.tool_calls")
        try:
            arguments = orjson.loads(function.get("arguments") or "{}")
        except (orjson.JSONDecodeError, TypeError):
            arguments = None
        if not isinstance(arguments, dict):
            raise refused(
                provider, "needs each tool call's arguments to be a JSON object",
                f"{where}.tool_calls[{index}].function.arguments",
            )  # fmt: skip
        yield call, function, arguments


def tool_choice_of(choice: Any, provider: str, refused: Refuse) -> tuple[str, Any]:
    """What an OpenAI `tool_choice` asks for, as (kind, detail): ("auto", None) (also when none
    is given), ("none", None), ("required", None), ("function", the function's name) or
    ("allowed_tools", its `allowed_tools` value as given); anything else is refused."""
    if choice is None or choice == "auto":
        return "auto", None
    if choice in ("required", "none"):
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return "function", function["name"]
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        return "allowed_tools", choice.get("allowed_tools")
    raise refused(provider, f"cannot translate tool_choice {choice!r}", "tool_choice")


def pdf_data(file: Mapping[str, Any], provider: str, refused: Refuse, where: str) -> str:
    """The base64 data of a `file` part given as a PDF data URL (`where`: the part); file ids
    and other media types are refused."""
    given = file.get("file_data")
    parsed = data_url(given) if isinstance(given, str) else None
    if parsed is None or parsed[0] != "application/pdf":
        raise refused(
            provider, "takes file parts only as PDF data (file_data: a data:application/pdf;"
            "base64 URL), not file ids", f"{where}.file",
        )  # fmt: skip
    return parsed[1]
