"""OpenAI chat request → Anthropic Messages request (pure translation).

What is translated, what is dropped and what is refused:
- system/developer messages → the top-level `system` (joined, in order); user, assistant and
  tool turns → `messages`, consecutive turns of one role merged into one (tool results are user
  turns: consecutive `role: tool` messages become one user turn of `tool_result` blocks, first);
- content parts: text; images (data URLs → a base64 source, http(s) URLs → a url source); PDF
  `file` parts given as data → a base64 document; audio and file ids are refused (400);
- `max_tokens` is always sent: the request's `max_completion_tokens` / `max_tokens` (at most the
  catalog's `max_output`, which is the model's own limit), else the catalog's `max_output`, else
  DEFAULT_MAX_TOKENS (the output cap budgets assume for a model the catalog gives none);
- `temperature` is clamped to Anthropic's 0–1 (OpenAI's 0–1 is sent unchanged, 1–2 as 1);
  `top_p` is sent only without a temperature (Anthropic's newer models refuse both at once);
  `top_k`, `stop` (→ `stop_sequences`), `user` (→ `metadata.user_id`), `tools`, `tool_choice`,
  `parallel_tool_calls` (false → `disable_parallel_tool_use`). The API version sent
  (2023-06-01) takes the sampling parameters, but models that have none (Opus 4.7 and later,
  the Claude 5 family) refuse them with a 400: drop them with a `rewrite` rule there;
- `response_format: json_schema` → a tool whose `input_schema` is the schema, forced with
  `tool_choice` (`OutputTool`; the answer side turns its call back into content);
- `n > 1` is refused (400, naming the provider); every other OpenAI parameter (seed, penalties,
  logprobs, logit_bias, OpenAI's metadata, service_tier, store, …) is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.errors import UpstreamError
from sidecar.providers.translate import (
    assistant_text,
    data_url,
    is_number,
    merged_turns,
    one_choice,
    pdf_data,
    text_of,
    tool_calls,
    tool_choice_of,
    tool_results_as_user,
    unsupported,
)

DEFAULT_MAX_TOKENS = 4096  # when neither the request nor the catalog gives an output cap
MAX_USER_ID = 256  # metadata.user_id's longest; a longer `user` is dropped
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_TOOL_NAME = re.compile(r"[^a-zA-Z0-9_-]")
_DEFS = ("$defs", "definitions")


def refused(provider: str, message: str, param: str) -> UpstreamError:
    return unsupported(provider, "Anthropic Messages API", message, param)


@dataclass(frozen=True, slots=True)
class OutputTool:
    """The tool that carries a json_schema answer. `wrapped`: the schema is not an object
    schema, so the tool's input is `{"value": answer}`."""

    name: str
    input_schema: dict[str, Any]
    description: str
    wrapped: bool

    def answer(self, tool_input: Any) -> str:
        """The content the client gets for the tool's input."""
        if self.wrapped and isinstance(tool_input, dict):
            tool_input = tool_input.get("value")
        return orjson.dumps(tool_input).decode()


def output_tool(body: dict[str, Any]) -> OutputTool | None:
    """The output tool of a request that asks for json_schema, else None. A function of the
    body alone: the request and the answer side each derive the same one."""
    response_format = body.get("response_format")
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema")
    spec = spec if isinstance(spec, dict) else {}
    name = _TOOL_NAME.sub("_", str(spec.get("name") or ""))[:64] or "answer"
    if name in _tool_names(body):
        name = ("answer_" + name)[:64]
    description = spec.get("description")
    description = (
        description
        if isinstance(description, str) and description
        else "Give your final answer with this tool: its input is the answer."
    )
    schema, wrapped = _object_schema(spec.get("schema", {}))
    return OutputTool(name, schema, description, wrapped)


def _object_schema(schema: Any) -> tuple[dict[str, Any], bool]:
    """An `input_schema` (which must describe an object) for `schema`, and whether the schema
    had to be wrapped in `{"value": ...}`; `$defs` stay at the root, where refs point."""
    if not isinstance(schema, dict):  # `true`: anything
        schema = {}
    kind = schema.get("type")
    if kind == "object":
        return schema, False
    if kind is None and "properties" in schema:
        return {**schema, "type": "object"}, False
    inner = {k: v for k, v in schema.items() if k not in _DEFS}
    defs = {k: schema[k] for k in _DEFS if k in schema}
    wrapper = {"type": "object", "properties": {"value": inner}, "required": ["value"], **defs}
    return wrapper, True


def _tool_names(body: dict[str, Any]) -> set[str]:
    tools = body.get("tools")
    names: set[str] = set()
    for tool in tools if isinstance(tools, list) else ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return names


def messages_body(
    body: dict[str, Any], model_id: str, max_output: int | None, stream: bool, provider: str
) -> dict[str, Any]:
    """The Messages API body for an OpenAI chat body (see the module's docstring)."""
    one_choice(body, provider, refused)
    system, turns = _turns(body.get("messages") or [], provider)
    out: dict[str, Any] = {"model": model_id, "max_tokens": _max_tokens(body, max_output)}
    if not turns and system:  # only system text: Anthropic needs a user turn
        turns, system = [{"role": "user", "content": system}], ""
    if not turns:
        raise refused(provider, "needs at least one message with content", "messages")
    out["messages"] = turns
    if system:
        out["system"] = system
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        out["temperature"] = min(temperature, 1)
    elif is_number(body.get("top_p")):
        out["top_p"] = body["top_p"]
    if is_number(body.get("top_k")):
        out["top_k"] = body["top_k"]
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list) and stop:
        out["stop_sequences"] = stop
    user = body.get("user")
    if isinstance(user, str) and 0 < len(user) <= MAX_USER_ID:
        out["metadata"] = {"user_id": user}
    _tools(body, out, provider)
    if "tools" not in out:
        _history_tools(turns, out)
    if stream:
        out["stream"] = True
    return out


def _max_tokens(body: dict[str, Any], max_output: int | None) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return min(value, max_output) if max_output else value
    return max_output or DEFAULT_MAX_TOKENS


def _tools(body: dict[str, Any], out: dict[str, Any], provider: str) -> None:
    """`tools` and `tool_choice`, the output tool of json_schema included."""
    tools: list[dict[str, Any]] = []
    given = body.get("tools")
    for index, tool in enumerate(given if isinstance(given, list) else ()):
        function = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise refused(provider, "takes only function tools", f"tools[{index}]")
        parameters = function.get("parameters")
        schema = dict(parameters) if isinstance(parameters, dict) else {"properties": {}}
        schema.setdefault("type", "object")
        translated = {"name": function.get("name"), "input_schema": schema}
        if isinstance(function.get("description"), str):
            translated["description"] = function["description"]
        tools.append(translated)
    choice = _tool_choice(body.get("tool_choice"), provider) if tools else None
    answer = output_tool(body)
    if answer is not None and (choice is None or choice["type"] != "tool"):
        tools.append(
            {"name": answer.name, "description": answer.description,
             "input_schema": answer.input_schema}
        )  # fmt: skip
        # with tools of the client's own to call, the model may call those or answer
        free = tools[:-1] and (choice is None or choice["type"] in ("auto", "any"))
        choice = {"type": "any"} if free else {"type": "tool", "name": answer.name}
    if not tools:
        return
    out["tools"] = tools
    if choice is None:
        choice = {"type": "auto"}
    if body.get("parallel_tool_calls") is False and choice["type"] != "none":
        choice["disable_parallel_tool_use"] = True
    out["tool_choice"] = choice


def _history_tools(turns: list[dict[str, Any]], out: dict[str, Any]) -> None:
    """Tools for a conversation whose history has tool calls but whose request lists no
    tools (OpenAI takes that; Anthropic refuses tool_use blocks without tool definitions):
    each called tool by name, open schema, and `tool_choice: none`, so none is called."""
    names = {
        block["name"]
        for turn in turns
        if turn["role"] == "assistant" and isinstance(turn["content"], list)
        for block in turn["content"]
        if block["type"] == "tool_use"
    }
    if names:
        out["tools"] = [
            {"name": name, "input_schema": {"type": "object"}} for name in sorted(names)
        ]
        out["tool_choice"] = {"type": "none"}


def _tool_choice(choice: Any, provider: str) -> dict[str, Any] | None:
    kind, detail = tool_choice_of(choice, provider, refused)
    if kind == "function":
        return {"type": "tool", "name": detail}
    if kind == "allowed_tools":
        kind = "required" if (detail or {}).get("mode") == "required" else "auto"
    return {"required": {"type": "any"}, "none": {"type": "none"}}.get(kind)


def _turns(messages: list[Any], provider: str) -> tuple[str, list[dict[str, Any]]]:
    """(system text, Messages turns): consecutive turns of one role merged, each user turn's
    tool results first (Anthropic's rule), a lone text block sent as a plain string."""

    turn_of = tool_results_as_user(provider, refused, _user_blocks, _assistant_blocks, _tool_result)
    system, turns = merged_turns(messages, turn_of)
    for turn in turns:
        blocks = turn["content"]
        if turn["role"] == "user" and len(blocks) > 1:
            blocks.sort(key=lambda block: block["type"] != "tool_result")  # stable
        if len(blocks) == 1 and blocks[0]["type"] == "text":
            turn["content"] = blocks[0]["text"]
    return "\n\n".join(system), turns


def _user_blocks(content: Any, provider: str, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for index, part in enumerate(content if isinstance(content, list) else ()):
        kind = part.get("type")
        at = f"{where}.content[{index}]"
        if kind == "text":
            if part["text"]:
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(part["image_url"]["url"], provider, at))
        elif kind == "file":
            blocks.append(_document(part["file"], provider, at))
        else:
            raise refused(provider, f"does not take {kind!r} content parts", at)
    return blocks


def _image(url: str, provider: str, where: str) -> dict[str, Any]:
    if url.startswith("data:"):
        parsed = data_url(url)
        if parsed is None or parsed[0] not in IMAGE_TYPES:
            raise refused(
                provider, "takes images as base64 data URLs of image/jpeg, image/png, "
                "image/gif or image/webp, or as https URLs", f"{where}.image_url",
            )  # fmt: skip
        source = {"type": "base64", "media_type": parsed[0], "data": parsed[1]}
        return {"type": "image", "source": source}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise refused(provider, "takes images as data URLs or https URLs", f"{where}.image_url")


def _document(file: dict[str, Any], provider: str, where: str) -> dict[str, Any]:
    data = pdf_data(file, provider, refused, where)
    source = {"type": "base64", "media_type": "application/pdf", "data": data}
    return {"type": "document", "source": source}


def _assistant_blocks(message: dict[str, Any], provider: str, where: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    text = assistant_text(message.get("content"))
    if text:
        blocks.append({"type": "text", "text": text})
    calls = tool_calls(message.get("tool_calls"), provider, refused, where)
    for call, function, tool_input in calls:
        blocks.append(
            {"type": "tool_use", "id": _tool_id(call.get("id")), "name": function.get("name"),
             "input": tool_input}
        )  # fmt: skip
    return blocks


def _tool_id(given: Any) -> str:
    """A tool call id as Anthropic takes it (`^[a-zA-Z0-9_-]+$`): other providers' ids may hold
    other characters; a call and its result are mapped alike."""
    return _TOOL_NAME.sub("_", given) if isinstance(given, str) and given else "call"


def _tool_result(message: dict[str, Any]) -> dict[str, Any]:
    block: dict[str, Any] = {
        "type": "tool_result",
        "tool_use_id": _tool_id(message["tool_call_id"]),
    }
    text = text_of(message.get("content"))
    if text:
        block["content"] = text
    return block
