"""The fake OpenAI's Responses API (`POST /v1/responses`): answers and stream events built
through the official SDK's models (`openai.types.responses`), so they cannot drift from what
OpenAI sends. A scripted `Reply` says the text (or the function calls), the usage, the
finish (`length` → incomplete) and, for streams, the pieces and a failure after some of them.

`background: true` answers a `queued` response with an id of its own and keeps it in a
`StoredResponses`: `GET /v1/responses/{id}` then gives it finished (the reply's output and
usage), `POST …/cancel` cancelled, `GET …/input_items` its input as items, `DELETE` removes it;
an unknown id is OpenAI's 404."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent
from pydantic import TypeAdapter

if TYPE_CHECKING:
    from tests.upstreams.openai_fake import Reply

EVENT = TypeAdapter(ResponseStreamEvent)
ITEM = TypeAdapter(ResponseItem)
PARAMS = (
    "instructions",
    "max_output_tokens",
    "metadata",
    "previous_response_id",
    "store",
    "temperature",
    "top_p",
    "tool_choice",
    "tools",
    "parallel_tool_calls",
    "text",
    "user",
)


def response(
    body: dict[str, Any], reply: Reply, status: str, output: list[dict[str, Any]]
) -> dict[str, Any]:
    """A `response` object echoing the request, validated by the SDK's model."""
    done = status not in ("in_progress", "queued")
    data: dict[str, Any] = {
        "id": "resp_fake",
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": body.get("model"),
        "output": output,
        "tools": body.get("tools", []),
        "tool_choice": body.get("tool_choice", "auto"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "usage": {
            "input_tokens": reply.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": reply.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        }
        if done
        else None,
        **{name: body[name] for name in PARAMS if name in body and name not in ("tools",)},
    }
    if data["usage"] is None:
        del data["usage"]  # OpenAI's schema: an object when present
    return Response.model_validate(data).model_dump(mode="json", exclude_unset=True)


def output_items(reply: Reply) -> list[dict[str, Any]]:
    if reply.tool_calls is not None:
        return [
            {
                "id": f"fc_fake{index}",
                "type": "function_call",
                "call_id": call["id"],
                "name": call["function"]["name"],
                "arguments": call["function"]["arguments"],
                "status": "completed",
            }
            for index, call in enumerate(reply.tool_calls)
        ]
    text = {"type": "output_text", "text": reply.content, "annotations": [], "logprobs": []}
    return [
        {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [text],
        }
    ]


def final_status(reply: Reply) -> str:
    return "incomplete" if reply.finish_reason == "length" else "completed"


class StoredResponses:
    """The background responses this fake made, by id: each finishes when it is retrieved."""

    def __init__(self) -> None:
        self.by_id: dict[str, tuple[dict[str, Any], Reply, str]] = {}  # body, reply, status
        self._ids = itertools.count(1)

    def queued(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        response_id = f"resp_bg{next(self._ids):04d}"
        self.by_id[response_id] = (body, reply, "queued")
        return {**response(body, reply, "queued", []), "id": response_id}

    def handle(self, method: str, response_id: str, action: str) -> web.Response:
        """GET / DELETE /v1/responses/{id}, POST …/cancel, GET …/input_items."""
        found = self.by_id.get(response_id)
        if found is None:
            return not_found(response_id)
        body, reply, status = found
        if method == "DELETE" and not action:
            del self.by_id[response_id]
            return web.json_response({"id": response_id, "object": "response", "deleted": True})
        if action == "input_items" and method == "GET":
            return web.json_response(input_items(response_id, body))
        if action == "cancel" and method == "POST":
            status = "cancelled" if status == "queued" else status
        elif action or method != "GET":
            return web.json_response({"error": {"message": "not a route"}}, status=404)
        elif status == "queued":
            status = final_status(reply)
        self.by_id[response_id] = (body, reply, status)
        output = output_items(reply) if status in ("completed", "incomplete") else []
        data = response(body, reply, status, output)
        if status == "cancelled":
            data.pop("usage", None)
        return web.json_response({**data, "id": response_id})


def not_found(response_id: str) -> web.Response:
    """OpenAI's answer for an id it does not have."""
    message = f"Response with id '{response_id}' not found."
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return web.json_response({"error": error}, status=404)


def input_items(response_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """A request's `input` as OpenAI lists it: a string is one user message."""
    given = body.get("input")
    messages = [{"role": "user", "content": given}] if isinstance(given, str) else given or []
    data = []
    for index, message in enumerate(messages):
        content = message.get("content")
        parts = [{"type": "input_text", "text": content}] if isinstance(content, str) else content
        item = {"id": f"msg_{response_id}_{index}", "type": "message", "role": message["role"],
                "status": "completed", "content": parts}  # fmt: skip
        ITEM.validate_python(item)
        data.append(item)
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": False}


async def answer(
    request: web.Request, body: dict[str, Any], reply: Reply, stored: StoredResponses
) -> web.StreamResponse:
    if body.get("background") and not body.get("stream"):
        return web.json_response(stored.queued(body, reply), headers=reply.headers)
    if not body.get("stream"):
        data = response(body, reply, final_status(reply), output_items(reply))
        return web.json_response(data, headers=reply.headers)
    stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", **reply.headers})
    await stream.prepare(request)
    sequence = 0

    async def send(event: dict[str, Any]) -> None:
        nonlocal sequence
        event = {**event, "sequence_number": sequence}
        sequence += 1
        EVENT.validate_python(event)
        name = event["type"].encode()
        await stream.write(b"event: " + name + b"\ndata: " + orjson.dumps(event) + b"\n\n")

    started = response(body, reply, "in_progress", [])
    await send({"type": "response.created", "response": started})
    await send({"type": "response.in_progress", "response": started})
    item = output_items(reply)[0]  # one item: the message, or the first call
    if item["type"] == "message":
        at = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        await send(
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**item, "status": "in_progress", "content": []},
            }
        )
        empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        await send({"type": "response.content_part.added", "part": empty, **at})
        size = max(1, -(-len(reply.content) // reply.chunks))
        for index, start in enumerate(range(0, len(reply.content), size)):
            if reply.error_after_chunks is not None and index == reply.error_after_chunks:
                await send(
                    {
                        "type": "error",
                        "code": "server_error",
                        "message": "fake mid-stream failure",
                        "param": None,
                    }
                )
                await stream.write_eof()
                return stream
            if reply.chunk_delay:
                await asyncio.sleep(reply.chunk_delay)
            piece = reply.content[start : start + size]
            await send({"type": "response.output_text.delta", "delta": piece, "logprobs": [], **at})
        await send(
            {"type": "response.output_text.done", "text": reply.content, "logprobs": [], **at}
        )
        await send({"type": "response.content_part.done", "part": item["content"][0], **at})
    else:
        at = {"item_id": item["id"], "output_index": 0}
        await send(
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**item, "status": "in_progress", "arguments": ""},
            }
        )
        await send(
            {"type": "response.function_call_arguments.delta", "delta": item["arguments"], **at}
        )
        await send(
            {"type": "response.function_call_arguments.done", "arguments": item["arguments"], **at}
        )
    await send({"type": "response.output_item.done", "output_index": 0, "item": item})
    status = final_status(reply)
    final = response(body, reply, status, [item])
    await send({"type": f"response.{status}", "response": final})
    await stream.write_eof()
    return stream
