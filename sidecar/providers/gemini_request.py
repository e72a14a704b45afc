"""OpenAI chat request → Gemini `generateContent` request (pure translation).

The same body serves the Generative Language API (`gemini`) and Vertex AI (`vertex`).
What is translated, dropped and refused:
- system/developer messages → `systemInstruction` (in order, one text part each); user,
  assistant, tool (and the legacy function) messages → `contents` with roles user / model,
  consecutive turns of one role merged into one content;
- user parts: text; images and files as base64 data URLs → `inlineData`; image URLs
  (https, http, gs) → `fileData` (its MIME type guessed from the path when it can be);
  `input_audio` → `inlineData` audio/wav or audio/mp3; file ids and other part types are a 400;
- assistant `tool_calls` → `functionCall` parts (with the call's id, and the thought signature
  that Gemini sent with it, kept by the answer side in the call's
  `extra_content.google.thought_signature` as Google's own OpenAI endpoint does; a model turn
  whose calls carry none gets Google's documented placeholder on its first call, so that
  Gemini 3 takes a conversation begun elsewhere); `tool` messages → `functionResponse` parts
  in a user turn, named after the assistant call their `tool_call_id` answers (a JSON object
  result is sent as is, anything else as `{"output": text}`);
- generationConfig: temperature, top_p → topP, top_k → topK, max_completion_tokens /
  max_tokens → maxOutputTokens (the smaller when both; at most the catalog's max_output, the
  model's own limit, which Gemini would refuse to exceed), stop → stopSequences, n →
  candidateCount, seed (a 32-bit integer: a larger one is a 400), presence_penalty /
  frequency_penalty; response_format json_schema → responseMimeType application/json and
  responseJsonSchema, json_object → responseMimeType application/json;
- tools (functions only) → one tool of `functionDeclarations` (parameters as
  `parametersJsonSchema`); tool_choice → toolConfig.functionCallingConfig: auto → AUTO, none →
  NONE, required → ANY, a named function → ANY with allowedFunctionNames, allowed_tools → ANY
  with those names (mode required) or only those declarations (mode auto);
- dropped: parallel_tool_calls, logprobs, top_logprobs, logit_bias, user, metadata, store,
  service_tier, stream_options (Gemini always reports usage), reasoning_effort, and any other
  parameter Gemini has no field for.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import orjson

from sidecar.errors import UpstreamError
from sidecar.providers.translate import (
    assistant_text,
    data_url,
    is_int,
    is_number,
    merged_turns,
    text_of,
    tool_calls,
    tool_choice_of,
    unsupported,
)

# Google's documented stand-in for a thought signature the history does not have
# (ai.google.dev/gemini-api/docs/thought-signatures): Gemini 3 refuses a function call turn
# without one.
SIGNATURE_PLACEHOLDER = "skip_thought_signature_validator"
INT32 = 2**31
AUDIO_TYPES = MappingProxyType({"wav": "audio/wav", "mp3": "audio/mp3"})
JSON_MIME = "application/json"


def refused(provider: str, message: str, param: str) -> UpstreamError:
    return unsupported(provider, "Gemini API", message, param)


def generate_body(
    body: Mapping[str, Any], provider: str, max_output: int | None = None
) -> dict[str, Any]:
    """The generateContent body for an OpenAI chat body (see the module's docstring)."""
    system, contents = _contents(body.get("messages") or [], provider)
    if not contents and system:  # only system text: Gemini needs a turn to answer
        contents, system = [{"role": "user", "parts": [{"text": "\n\n".join(system)}]}], []
    if not contents:
        raise refused(provider, "needs at least one message with content", "messages")
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": [{"text": text} for text in system]}
    tools, tool_config = _tools(body, provider)
    if tools:
        out["tools"] = tools
    if tool_config:
        out["toolConfig"] = tool_config
    config = _generation_config(body, provider, max_output)
    if config:
        out["generationConfig"] = config
    return out


def _generation_config(
    body: Mapping[str, Any], provider: str, max_output: int | None
) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for name, field in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("top_k", "topK"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ):
        if is_number(body.get(name)):
            config[field] = body[name]
    caps = [body[n] for n in ("max_completion_tokens", "max_tokens") if is_int(body.get(n))]
    if caps and max_output:
        caps.append(max_output)
    if caps:
        config["maxOutputTokens"] = min(caps)  # both asked for: both hold
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list) and stop:
        config["stopSequences"] = stop
    n = body.get("n")
    if is_int(n) and n > 1:
        config["candidateCount"] = n
    seed = body.get("seed")
    if is_int(seed):
        if not -INT32 <= seed < INT32:
            raise refused(
                provider, f"takes a 32-bit seed (-2147483648 to 2147483647), got {seed}", "seed"
            )
        config["seed"] = seed
    response_format = body.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema":
        config["responseMimeType"] = JSON_MIME
        spec = response_format.get("json_schema")  # type: ignore[union-attr]
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            config["responseJsonSchema"] = schema
    elif kind == "json_object":
        config["responseMimeType"] = JSON_MIME
    return config


# -- tools ------------------------------------------------------------------------------------
def _tools(
    body: Mapping[str, Any], provider: str
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    given = body.get("tools")
    declarations: list[dict[str, Any]] = []
    for index, tool in enumerate(given if isinstance(given, list) else ()):
        function = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise refused(provider, "takes only function tools", f"tools[{index}]")
        declaration: dict[str, Any] = {"name": function.get("name")}
        if isinstance(function.get("description"), str):
            declaration["description"] = function["description"]
        if isinstance(function.get("parameters"), dict):
            declaration["parametersJsonSchema"] = function["parameters"]
        declarations.append(declaration)
    if not declarations:
        return [], None
    mode, names = _tool_choice(body.get("tool_choice"), provider)
    config: dict[str, Any] | None = None
    if mode == "AUTO" and names is not None:  # allowed_tools, auto: only those are offered
        declarations = [d for d in declarations if d["name"] in names]
        if not declarations:
            return [], None
        names = None
    if mode != "AUTO" or names:
        config = {"functionCallingConfig": {"mode": mode}}
        if names:
            config["functionCallingConfig"]["allowedFunctionNames"] = names
    return [{"functionDeclarations": declarations}], config


def _tool_choice(choice: Any, provider: str) -> tuple[str, list[str] | None]:
    """(functionCallingConfig mode, allowed function names or None)."""
    kind, detail = tool_choice_of(choice, provider, refused)
    if kind == "function":
        return "ANY", [detail]
    if kind == "allowed_tools":
        allowed = detail if isinstance(detail, dict) else {}
        names = [
            tool["function"]["name"]
            for tool in allowed.get("tools") or ()
            if isinstance(tool, dict)
            and isinstance(tool.get("function"), dict)
            and isinstance(tool["function"].get("name"), str)
        ]
        return ("ANY" if allowed.get("mode") == "required" else "AUTO"), names
    return {"auto": "AUTO", "none": "NONE", "required": "ANY"}[kind], None


# -- messages ---------------------------------------------------------------------------------
def _contents(messages: list[Any], provider: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(system texts, contents): consecutive turns of one role merged into one content."""
    names = _call_names(messages)

    def turn_of(role: str, message: dict[str, Any], where: str) -> tuple[str, list[Any]]:
        if role == "user":
            return role, _user_parts(message.get("content"), provider, where)
        if role == "assistant":
            return "model", _model_parts(message, provider, where)
        if role == "tool":
            call_id = message["tool_call_id"]
            name = names.get(call_id)
            if name is None:
                raise refused(
                    provider, f"needs the assistant message whose tool call {call_id!r} this "
                    "tool message answers: Gemini names each function result after its call",
                    f"{where}.tool_call_id",
                )  # fmt: skip
            response = {"id": call_id, "name": name, "response": _result(message)}
            return "user", [{"functionResponse": response}]
        if role == "function":  # the legacy form of a tool result, named
            response = {"name": str(message.get("name") or ""), "response": _result(message)}
            return "user", [{"functionResponse": response}]
        raise refused(provider, f"cannot translate role {role!r}", f"{where}.role")

    return merged_turns(messages, turn_of, "parts")


def _call_names(messages: list[Any]) -> dict[str, str]:
    """Tool call id → function name, over every assistant message of the request."""
    names: dict[str, str] = {}
    for message in messages:
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(call.get("id"), str):
                names[call["id"]] = str(function.get("name") or "")
    return names


def _result(message: Mapping[str, Any]) -> dict[str, Any]:
    """A tool result as Gemini's `response` object: a JSON object as is, else its text as
    `output` (the key Gemini reads a function's output from)."""
    text = text_of(message.get("content"))
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {"output": text}


def _user_parts(content: Any, provider: str, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content if isinstance(content, list) else ()):
        kind = part.get("type")
        at = f"{where}.content[{index}]"
        if kind == "text":
            if part["text"]:
                parts.append({"text": part["text"]})
        elif kind == "image_url":
            parts.append(_media(part["image_url"]["url"], provider, f"{at}.image_url"))
        elif kind == "input_audio":
            parts.append(_audio(part["input_audio"], provider, f"{at}.input_audio"))
        elif kind == "file":
            parts.append(_file(part["file"], provider, f"{at}.file"))
        else:
            raise refused(provider, f"does not take {kind!r} content parts", at)
    return parts


def _media(url: str, provider: str, where: str) -> dict[str, Any]:
    if url.startswith("data:"):
        parsed = data_url(url)
        if parsed is None or not parsed[0]:
            raise refused(provider, "takes data URLs only in base64 with a media type", where)
        return {"inlineData": {"mimeType": parsed[0], "data": parsed[1]}}
    if url.startswith(("https://", "http://", "gs://")):
        file_data = {"fileUri": url}
        guessed = mimetypes.guess_type(url.split("?", 1)[0], strict=False)[0]
        if guessed:
            file_data["mimeType"] = guessed
        return {"fileData": file_data}
    raise refused(provider, "takes images as data URLs or https / gs URLs", where)


def _audio(audio: Mapping[str, Any], provider: str, where: str) -> dict[str, Any]:
    mime = AUDIO_TYPES.get(str(audio.get("format")))
    data = audio.get("data")
    if mime is None or not isinstance(data, str):
        raise refused(provider, "takes input_audio as base64 data in wav or mp3", where)
    return {"inlineData": {"mimeType": mime, "data": data}}


def _file(file: Mapping[str, Any], provider: str, where: str) -> dict[str, Any]:
    given = file.get("file_data")
    parsed = data_url(given) if isinstance(given, str) else None
    if parsed is None or not parsed[0]:
        raise refused(
            provider, "takes file parts as data (file_data: a base64 data URL), not file ids",
            where,
        )  # fmt: skip
    return {"inlineData": {"mimeType": parsed[0], "data": parsed[1]}}


def _model_parts(message: Mapping[str, Any], provider: str, where: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    text = assistant_text(message.get("content"))
    if text:
        parts.append({"text": text})
    calls = message.get("tool_calls")
    legacy = message.get("function_call")
    if not calls and isinstance(legacy, dict):
        calls = [{"function": legacy}]
    signed = False
    for call, function, args in tool_calls(calls, provider, refused, where):
        function_call: dict[str, Any] = {"name": str(function.get("name") or ""), "args": args}
        if isinstance(call.get("id"), str):
            function_call["id"] = call["id"]
        part: dict[str, Any] = {"functionCall": function_call}
        signature = _signature(call)
        if signature is not None:
            part["thoughtSignature"] = signature
            signed = True
        parts.append(part)
    if calls and not signed:
        first = next(p for p in parts if "functionCall" in p)
        first["thoughtSignature"] = SIGNATURE_PLACEHOLDER
    return parts


def _signature(call: Mapping[str, Any]) -> str | None:
    extra = call.get("extra_content")
    google = extra.get("google") if isinstance(extra, dict) else None
    signature = google.get("thought_signature") if isinstance(google, dict) else None
    return signature if isinstance(signature, str) and signature else None
