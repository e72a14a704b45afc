"""OpenAI chat request → Amazon Bedrock Converse request (pure translation).

What is translated, what is dropped and what is refused:
- system/developer messages → the top-level `system` text blocks, in order; user, assistant and
  tool turns → `messages`, consecutive turns of one role merged into one (Converse wants the
  roles to alternate): consecutive `role: tool` messages become one user turn of `toolResult`
  blocks, first;
- content parts: text; images as base64 data URLs (png, jpeg, gif, webp) → `image` blocks with
  their bytes; PDF `file` parts given as data → `document` blocks. Converse cannot fetch an
  image by URL (only bytes or S3): an http(s) image URL is refused (400, naming the provider);
- assistant `tool_calls` → `toolUse` blocks, `tool` messages → `toolResult` blocks; the ids are
  kept (characters Converse does not take in an id become `_`, on both sides alike);
- `inferenceConfig`: `maxTokens` (the smaller of `max_completion_tokens` and `max_tokens`),
  `temperature` (clamped to Converse's 0–1), `topP`, `stopSequences` (`stop`);
- `tools` → `toolConfig.tools[].toolSpec` (the parameters as `inputSchema.json`), `tool_choice`
  auto / required / a named function → `auto` / `any` / `tool`; `none` leaves the tools out
  (Converse has no "none"), unless the conversation already holds tool calls or results, which
  Converse accepts only with a `toolConfig`: then the tools go with `auto`;
- `response_format: json_schema` → a tool whose input schema is the schema, forced with
  `toolChoice.tool` (the answer side turns its call back into content; the same `OutputTool`
  as the anthropic kind's);
- `n > 1` is refused (400, naming the provider); every other OpenAI parameter (seed,
  penalties, logprobs, logit_bias, user, metadata, parallel_tool_calls, json_object, …) is
  dropped.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Any

from sidecar.errors import UpstreamError
from sidecar.providers.anthropic_request import output_tool
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

IMAGE_FORMATS = MappingProxyType(
    {"image/png": "png", "image/jpeg": "jpeg", "image/gif": "gif", "image/webp": "webp"}
)
_TOOL_ID = re.compile(r"[^a-zA-Z0-9_.:-]")


def refused(provider: str, message: str, param: str) -> UpstreamError:
    return unsupported(provider, "Amazon Bedrock Converse API", message, param)


def tool_use_id(value: Any) -> str:
    """An OpenAI tool call id as Converse takes one (`[a-zA-Z0-9_.:-]{1,64}`)."""
    return _TOOL_ID.sub("_", str(value or "call"))[:64] or "call"


def converse_body(body: dict[str, Any], provider: str) -> dict[str, Any]:
    """The Converse (and ConverseStream) body for an OpenAI chat body; see the module's
    docstring. The model id travels in the URL, not here."""
    one_choice(body, provider, refused)
    system, turns = _turns(body.get("messages") or [], provider)
    if not turns and system:  # only system text: Converse needs a user turn
        turns = [{"role": "user", "content": system}]
        system = []
    if not turns:
        raise refused(provider, "needs at least one message with content", "messages")
    out: dict[str, Any] = {"messages": turns}
    if system:
        out["system"] = system
    inference = _inference(body)
    if inference:
        out["inferenceConfig"] = inference
    tool_config = _tool_config(body, turns, provider)
    if tool_config is not None:
        out["toolConfig"] = tool_config
    return out


def _inference(body: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    caps = [
        value
        for value in (body.get("max_completion_tokens"), body.get("max_tokens"))
        if isinstance(value, int) and not isinstance(value, bool) and value > 0
    ]
    if caps:
        config["maxTokens"] = min(caps)
    for name, field in (("temperature", "temperature"), ("top_p", "topP")):
        value: Any = body.get(name)
        if is_number(value):
            config[field] = min(max(value, 0), 1)  # Converse takes 0-1; OpenAI's 1-2 is 1
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list):
        sequences = [s for s in stop if isinstance(s, str) and s]
        if sequences:
            config["stopSequences"] = sequences
    return config


def _tool_config(
    body: dict[str, Any], turns: list[dict[str, Any]], provider: str
) -> dict[str, Any] | None:
    """`toolConfig` for the client's tools and `tool_choice`, the output tool of json_schema
    included; None for a request that has neither."""
    tools: list[dict[str, Any]] = []
    given = body.get("tools")
    for index, tool in enumerate(given if isinstance(given, list) else ()):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise refused(provider, "takes only function tools", f"tools[{index}]")
        parameters = function.get("parameters")
        schema = dict(parameters) if isinstance(parameters, dict) else {"properties": {}}
        schema.setdefault("type", "object")
        spec: dict[str, Any] = {"name": function.get("name"), "inputSchema": {"json": schema}}
        description = function.get("description")
        if isinstance(description, str) and description:
            spec["description"] = description
        tools.append({"toolSpec": spec})
    choice = _tool_choice(body.get("tool_choice"), provider) if tools else None
    if choice == "none":
        if not _holds_tool_blocks(turns):
            tools = []
        choice = None
    answer = output_tool(body)
    if answer is not None and (choice is None or "tool" not in choice):
        spec = {
            "name": answer.name,
            "description": answer.description,
            "inputSchema": {"json": answer.input_schema},
        }
        tools.append({"toolSpec": spec})
        # with tools of the client's own to call, the model may call those or answer
        free = len(tools) > 1 and (choice is None or "auto" in choice or "any" in choice)
        choice = {"any": {}} if free else {"tool": {"name": answer.name}}
    if not tools:
        return None
    return {"tools": tools, "toolChoice": choice or {"auto": {}}}


def _tool_choice(choice: Any, provider: str) -> Any:
    """A Converse `toolChoice`, None for the default (auto), or "none"."""
    kind, detail = tool_choice_of(choice, provider, refused)
    if kind == "function":
        return {"tool": {"name": detail}}
    if kind == "allowed_tools":
        kind = "required" if (detail or {}).get("mode") == "required" else "auto"
    return {"required": {"any": {}}, "none": "none"}.get(kind)


def _holds_tool_blocks(turns: list[dict[str, Any]]) -> bool:
    return any(
        "toolUse" in block or "toolResult" in block for turn in turns for block in turn["content"]
    )


def _turns(messages: list[Any], provider: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system blocks, Converse turns): consecutive turns of one role merged, each user turn's
    tool results first."""

    turn_of = tool_results_as_user(provider, refused, _user_blocks, _assistant_blocks, _tool_result)
    texts, turns = merged_turns(messages, turn_of)
    system = [{"text": text} for text in texts]
    for turn in turns:
        if turn["role"] == "user" and len(turn["content"]) > 1:
            turn["content"].sort(key=lambda block: "toolResult" not in block)  # stable
    return system, turns


def _user_blocks(content: Any, provider: str, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    documents = 0
    for index, part in enumerate(content if isinstance(content, list) else ()):
        kind = part.get("type")
        at = f"{where}.content[{index}]"
        if kind == "text":
            if part["text"]:
                blocks.append({"text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(part["image_url"]["url"], provider, at))
        elif kind == "file":
            documents += 1
            blocks.append(_document(part["file"], documents, provider, at))
        else:
            raise refused(provider, f"does not take {kind!r} content parts", at)
    return blocks


def _image(url: str, provider: str, where: str) -> dict[str, Any]:
    parsed = data_url(url) if url.startswith("data:") else None
    image_format = IMAGE_FORMATS.get(parsed[0]) if parsed is not None else None
    if parsed is None or image_format is None:
        fetched = " (Converse does not fetch URLs)" if url.startswith(("https:", "http:")) else ""
        raise refused(
            provider, "takes images only as base64 data URLs of image/png, image/jpeg, "
            f"image/gif or image/webp{fetched}: send data:image/png;base64,...",
            f"{where}.image_url",
        )  # fmt: skip
    return {"image": {"format": image_format, "source": {"bytes": parsed[1]}}}


def _document(file: dict[str, Any], number: int, provider: str, where: str) -> dict[str, Any]:
    source = {"bytes": pdf_data(file, provider, refused, where)}
    return {"document": {"format": "pdf", "name": f"document {number}", "source": source}}


def _assistant_blocks(message: dict[str, Any], provider: str, where: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    text = assistant_text(message.get("content"))
    if text:
        blocks.append({"text": text})
    calls = tool_calls(message.get("tool_calls"), provider, refused, where)
    for call, function, tool_input in calls:
        use = {"toolUseId": tool_use_id(call.get("id")), "name": function.get("name"),
               "input": tool_input}  # fmt: skip
        blocks.append({"toolUse": use})
    return blocks


def _tool_result(message: dict[str, Any]) -> dict[str, Any]:
    text = text_of(message.get("content"))
    result = {
        "toolUseId": tool_use_id(message.get("tool_call_id")),
        "content": [{"text": text}] if text else [],
    }
    return {"toolResult": result}
