"""Responses API stream events (`POST /v1/responses` with `stream: true`).

`ChatEvents` rebuilds a translated request's chat chunks as the events the native API sends:
response.created and .in_progress, then per output item .output_item.added, a message's
.content_part.added and .output_text.delta (or .refusal.delta), a function call's
.function_call_arguments.delta, their .done events, and response.completed (or .incomplete)
with the usage. `NativeEvents` passes a native provider's events through, keeping what a
failure event needs. Either ends a stream cut short with an `error` event and
response.failed. Every event is sent with its `event:` name and a `sequence_number`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from sidecar.responses_answer import (
    function_call_item,
    item_id,
    message_item,
    response_object,
    responses_usage,
    status_of,
)


def encode(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


@dataclass(slots=True)
class _Item:
    output_index: int
    id: str
    kind: str  # "output_text", "refusal" (a message's one part) or "function_call"
    text: list[str] = field(default_factory=list)
    call_id: str = ""
    name: str = ""


class ChatEvents:
    """One translated stream: chat chunks in, Responses events (SSE bytes) out."""

    def __init__(self, request: dict[str, Any], rid: str, created_at: int) -> None:
        self.request = request
        self.rid = rid
        self.created_at = created_at
        self.model = str(request.get("model"))
        self.sequence = 0
        self.items: list[_Item] = []
        self.message: _Item | None = None
        self.calls: dict[int, _Item] = {}
        self.finish_reason: str | None = None
        self.usage: Any = None
        self.started = False

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return encode(event)

    def _snapshot(self, status: str = "in_progress", **extra: Any) -> dict[str, Any]:
        return response_object(self.request, self.rid, self.created_at, self.model, status, **extra)

    def start(self) -> list[bytes]:
        self.started = True
        snapshot = self._snapshot()
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def feed(self, chunks: list[bytes]) -> list[bytes]:
        out: list[bytes] = [] if self.started else self.start()
        for data in chunks:
            chunk = orjson.loads(data)
            if not isinstance(chunk, dict):
                continue
            if isinstance(chunk.get("model"), str) and chunk["model"]:
                self.model = chunk["model"]
            if isinstance(chunk.get("usage"), dict):
                self.usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    self._delta(delta, out)
                if isinstance(choice.get("finish_reason"), str):
                    self.finish_reason = choice["finish_reason"]
        return out

    def _delta(self, delta: dict[str, Any], out: list[bytes]) -> None:
        for kind in ("content", "refusal"):
            piece = delta.get(kind)
            if isinstance(piece, str) and piece:
                self._text(piece, "output_text" if kind == "content" else "refusal", out)
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                self._call(call, out)

    def _text(self, piece: str, kind: str, out: list[bytes]) -> None:
        item = self.message
        if item is None or item.kind != kind:
            item = self.message = _Item(len(self.items), item_id("msg"), kind)
            self.items.append(item)
            added = message_item(item.id, "", "in_progress", refusal=kind == "refusal")
            part = added["content"][0]
            added["content"] = []
            out.append(
                self._event(
                    "response.output_item.added", output_index=item.output_index, item=added
                )
            )
            out.append(
                self._event(
                    "response.content_part.added",
                    item_id=item.id,
                    output_index=item.output_index,
                    content_index=0,
                    part=part,
                )
            )
        item.text.append(piece)
        if kind == "refusal":
            out.append(
                self._event(
                    "response.refusal.delta",
                    item_id=item.id,
                    output_index=item.output_index,
                    content_index=0,
                    delta=piece,
                )
            )
        else:
            out.append(
                self._event(
                    "response.output_text.delta",
                    item_id=item.id,
                    output_index=item.output_index,
                    content_index=0,
                    delta=piece,
                    logprobs=[],
                )
            )

    def _call(self, call: dict[str, Any], out: list[bytes]) -> None:
        index = call.get("index", 0)
        given = call.get("function")
        function: dict[str, Any] = given if isinstance(given, dict) else {}
        item = self.calls.get(index)
        if item is None:
            self.message = None  # text after a call is a new message item
            item = _Item(len(self.items), item_id("fc"), "function_call")
            item.call_id = str(call.get("id") or item_id("call"))
            item.name = str(function.get("name") or "")
            self.calls[index] = item
            self.items.append(item)
            added = function_call_item(item.id, item.call_id, item.name, "", "in_progress")
            out.append(
                self._event(
                    "response.output_item.added", output_index=item.output_index, item=added
                )
            )
        elif isinstance(function.get("name"), str) and not item.name:
            item.name = function["name"]
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item.text.append(arguments)
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item.id,
                    output_index=item.output_index,
                    delta=arguments,
                )
            )

    def _output(self, item_status: str) -> list[dict[str, Any]]:
        """The items as the final response lists them."""
        output: list[dict[str, Any]] = []
        for item in self.items:
            text = "".join(item.text)
            if item.kind == "function_call":
                output.append(
                    function_call_item(item.id, item.call_id, item.name, text, item_status)
                )
            else:
                refusal = item.kind == "refusal"
                output.append(message_item(item.id, text, item_status, refusal=refusal))
        return output

    def _done(self, output: list[dict[str, Any]]) -> list[bytes]:
        """The .done events of every item (`output` as `_output` lists them)."""
        out: list[bytes] = []
        for index, done in enumerate(output):
            at = {"output_index": index}
            if done["type"] == "function_call":
                out.append(
                    self._event(
                        "response.function_call_arguments.done",
                        item_id=done["id"],
                        name=done["name"],
                        arguments=done["arguments"],
                        **at,
                    )
                )
            else:
                part = done["content"][0]
                where = {"item_id": done["id"], "content_index": 0, **at}
                if part["type"] == "refusal":
                    out.append(
                        self._event("response.refusal.done", refusal=part["refusal"], **where)
                    )
                else:
                    out.append(
                        self._event(
                            "response.output_text.done", text=part["text"], logprobs=[], **where
                        )
                    )
                out.append(self._event("response.content_part.done", part=part, **where))
            out.append(self._event("response.output_item.done", item=done, **at))
        return out

    def finish(self) -> list[bytes]:
        """The end of an answer: every item done, then response.completed or .incomplete."""
        out: list[bytes] = [] if self.started else self.start()
        status, incomplete = status_of(self.finish_reason)
        output = self._output("incomplete" if incomplete else "completed")
        out += self._done(output)
        final = self._snapshot(
            status, output=output, usage=responses_usage(self.usage), incomplete=incomplete
        )
        out.append(self._event(f"response.{status}", response=final))
        return out

    def fail(self, code: str, message: str) -> list[bytes]:
        """A stream cut short: an `error` event, then response.failed with what was produced."""
        out: list[bytes] = [] if self.started else self.start()
        out.append(self._event("error", code=code, message=message, param=None))
        final = self._snapshot(
            "failed",
            output=self._output("incomplete"),
            usage=responses_usage(self.usage) if self.usage else None,
            error={"code": "server_error", "message": message},
        )
        out.append(self._event("response.failed", response=final))
        return out


class NativeEvents:
    """A native provider's events, passed through with their names; what a failure event that
    ends them needs (the response's id, time and model; the next sequence number) is kept."""

    def __init__(self, request: dict[str, Any], rid: str, created_at: int) -> None:
        self.request = request
        self.snapshot: dict[str, Any] | None = None
        self.rid = rid
        self.created_at = created_at
        self.sequence = 0

    def feed(self, chunks: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for data in chunks:
            event = orjson.loads(data)
            kind = event.get("type") if isinstance(event, dict) else None
            if not isinstance(kind, str):
                continue
            sequence = event.get("sequence_number")
            if isinstance(sequence, int):
                self.sequence = sequence + 1
            response = event.get("response")
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                self.snapshot = response
            out.append(b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n")
        return out

    def fail(self, code: str, message: str) -> list[bytes]:
        events: list[dict[str, Any]] = [
            {"type": "error", "code": code, "message": message, "param": None}
        ]
        if self.snapshot is not None:
            failed = {
                **self.snapshot,
                "status": "failed",
                "error": {"code": "server_error", "message": message},
            }
            events.append({"type": "response.failed", "response": failed})
        out = []
        for event in events:
            event["sequence_number"] = self.sequence
            self.sequence += 1
            out.append(encode(event))
        return out


def replay(final: dict[str, Any]) -> list[bytes]:
    """The events of a response that is already finished (an answer the schema loop produced
    buffered): its lifecycle, each output item with its text or arguments as one delta, and
    its final state."""
    events: list[dict[str, Any]] = []
    start = {key: value for key, value in final.items() if key != "usage"}
    start.update(status="in_progress", output=[])
    events.append({"type": "response.created", "response": start})
    events.append({"type": "response.in_progress", "response": start})
    for index, item in enumerate(final.get("output") or ()):
        at = {"output_index": index}
        kind = item.get("type")
        if kind == "message":
            events.append(
                {
                    "type": "response.output_item.added",
                    "item": {**item, "status": "in_progress", "content": []},
                    **at,
                }
            )
            for position, part in enumerate(item.get("content") or ()):
                where = {"item_id": item["id"], "content_index": position, **at}
                empty = (
                    {**part, "text": ""}
                    if part.get("type") == "output_text"
                    else {**part, "refusal": ""}
                )
                events.append({"type": "response.content_part.added", "part": empty, **where})
                if part.get("type") == "output_text":
                    text = part.get("text", "")
                    events.append(
                        {
                            "type": "response.output_text.delta",
                            "delta": text,
                            "logprobs": [],
                            **where,
                        }
                    )
                    events.append(
                        {"type": "response.output_text.done", "text": text, "logprobs": [], **where}
                    )
                else:
                    refusal = part.get("refusal", "")
                    events.append({"type": "response.refusal.delta", "delta": refusal, **where})
                    events.append({"type": "response.refusal.done", "refusal": refusal, **where})
                events.append({"type": "response.content_part.done", "part": part, **where})
        elif kind == "function_call":
            events.append(
                {
                    "type": "response.output_item.added",
                    "item": {**item, "status": "in_progress", "arguments": ""},
                    **at,
                }
            )
            where = {"item_id": item["id"], **at}
            arguments = item.get("arguments", "")
            events.append(
                {"type": "response.function_call_arguments.delta", "delta": arguments, **where}
            )
            name = item.get("name", "")
            events.append(
                {
                    "type": "response.function_call_arguments.done",
                    "name": name,
                    "arguments": arguments,
                    **where,
                }
            )
        else:
            events.append({"type": "response.output_item.added", "item": item, **at})
        events.append({"type": "response.output_item.done", "item": item, **at})
    status = final.get("status")
    ending = status if status in ("completed", "incomplete", "failed") else "completed"
    events.append({"type": f"response.{ending}", "response": final})
    out = []
    for sequence, event in enumerate(events):
        event["sequence_number"] = sequence
        out.append(encode(event))
    return out
