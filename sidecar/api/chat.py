"""POST /v1/chat/completions: the chat request/answer shape on the shared request path
(sidecar/api/request_path.py), answered as JSON or as SSE."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from sidecar import sse
from sidecar.api.answers import ringside_headers, send, sse_response
from sidecar.api.common import JSON_CONTENT_TYPE
from sidecar.api.request_path import ended_by_shutdown, handle
from sidecar.api.validation import (
    check_messages_ahead,
    requested_max_output,
    schema_format,
    validate_chat_request,
)
from sidecar.errors import (
    GatewayError,
    UpstreamError,
    internal_error,
    kept,
    server_shutting_down,
)
from sidecar.flow import Flow
from sidecar.routing import Estimate
from sidecar.runtime import Runtime
from sidecar.structured_stream import completion_chunks, mentions_tool_calls, streamed_failure

log = logging.getLogger("ringside")


class ChatCompletions:
    """The chat request/answer shape (an `Endpoint`)."""

    format_member = "response_format"

    def schema_format(self, body: dict[str, Any]) -> dict[str, Any] | None:
        return schema_format(body.get("response_format"))

    async def check_ahead(self, flow: Flow, pace: Callable[[], Awaitable[None]]) -> None:
        flow.checked_ahead = await check_messages_ahead(flow.body, pace)

    def prepare(self, flow: Flow, runtime: Runtime, raw: bytes | bytearray) -> Estimate:
        body = flow.body
        validate_chat_request(body, flow.checked_ahead)
        flow.schema_plan = runtime.services.schemas.plan(
            body.get("response_format"), flow.part_sizes, flow.schema_primed
        )
        flow.stream = body.get("stream") is True
        return Estimate(prompt_tokens=len(raw) // 4, max_output=requested_max_output(body))

    async def answer(
        self, flow: Flow, runtime: Runtime, request: web.Request
    ) -> web.StreamResponse:
        if flow.stream:
            return await _stream(flow, runtime, request)
        _candidate, completion = await runtime.cascade.run(flow)
        await runtime.pipeline.run("response", flow)
        payload = completion.raw if completion.raw is not None else orjson.dumps(completion.body)
        return web.Response(
            body=payload, content_type=JSON_CONTENT_TYPE, headers=ringside_headers(flow)
        )


CHAT = ChatCompletions()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await handle(request, CHAT)


async def _stream(flow: Flow, runtime: Runtime, request: web.Request) -> web.StreamResponse:
    cascade = runtime.cascade
    plan = flow.schema_plan
    watch = plan is not None  # validate the streamed answer at its end
    if plan is not None:
        flow.schema_enforced = True
        assert flow.route is not None
        if flow.route.candidates and not cascade.native_schema(flow.route.candidates[0], plan.kind):
            return await _stream_buffered(flow, runtime, request)
    attempt, stream, first = await cascade.open_stream(flow, framed=True)
    flow.first_token_at = time.perf_counter()
    flow.model_used = attempt.candidate.ref
    response = sse_response(flow)
    failure: UpstreamError | None = None
    tool_calls = watch and mentions_tool_calls(first)
    held = b""  # the whole answer, when it came with its head: it leaves with the end, in one write
    settled = False
    try:
        await response.prepare(request)
        if first:
            if stream.ended:
                held = sse.encode_all(first)
            else:
                await send(flow, response, sse.encode_all(first))
        ending = sse.DONE
        try:
            # (a head that was the whole answer leaves nothing: no step to end the iteration)
            while not stream.ended:
                try:
                    chunks = await stream.__anext__()
                except StopAsyncIteration:
                    break
                if watch and not tool_calls:
                    tool_calls = mentions_tool_calls(chunks)
                data = sse.encode_all(chunks)
                # not held while the write waits for a slow client: a chunk an adapter
                # re-encoded holds 4 KiB or more (orjson does not trim its output buffer)
                del chunks
                await send(flow, response, data)
        except UpstreamError as error:
            failure = error
            attempt.error = kept(error)
            envelope = GatewayError(503, "upstream_unavailable", error.message).envelope()
            ending = sse.encode(orjson.dumps(envelope))
        rejected = None
        if failure is None and flow.schema_plan is not None:
            rejected = streamed_failure(
                flow, attempt.candidate, flow.schema_plan, stream.content, tool_calls
            )
        if rejected is not None:
            flow.error, flow.status = rejected, rejected.status
            ending = sse.encode(rejected.body())
        # charged before the stream's last event leaves: a client that has the whole answer
        # was billed for it (a kill -9 after the end loses no charge)
        settled = True
        await cascade.finish_stream(flow, attempt, stream)
        data, held = held + ending, b""
        await send(flow, response, data, last=True)
    except ConnectionResetError:
        flow.status = 499  # the client went away mid-stream: nothing more to send
    except asyncio.CancelledError:
        if not (response.prepared and ended_by_shutdown(request)):
            flow.status = 499
            raise
        cut = server_shutting_down()  # the stream ends as an upstream failure would end it
        flow.error, flow.status = cut, cut.status
        with contextlib.suppress(Exception):
            await send(flow, response, held + sse.encode(cut.body()), last=True)
    except Exception:
        if not response.prepared:
            raise
        # headers are out: the only honest answer left is an SSE error event that ends the stream
        log.exception("internal error in stream %s", flow.id)
        internal = internal_error(flow.id)
        flow.error, flow.status = internal, 500
        with contextlib.suppress(Exception):
            await response.write(held + sse.encode(internal.body()))
            await response.write_eof()
    finally:
        if not settled:
            await cascade.finish_stream(flow, attempt, stream)
        if failure is not None:
            flow.error = GatewayError(503, "upstream_unavailable", failure.message)
            if flow.status != 499:
                flow.status = 503
    await runtime.pipeline.run("response", flow)
    return response


async def _stream_buffered(
    flow: Flow, runtime: Runtime, request: web.Request
) -> web.StreamResponse:
    """Structured output from a provider without native support: the re-prompt loop runs
    buffered, and only the validated answer is streamed, as OpenAI chunks."""
    _candidate, completion = await runtime.cascade.run(flow)
    options = flow.body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    chunks = completion_chunks(completion, include_usage)
    flow.first_token_at = time.perf_counter()
    response = sse_response(flow)
    try:
        await response.prepare(request)
        body = sse.encode_all(chunks) + sse.DONE
        await send(flow, response, body, last=True)
    except ConnectionResetError:
        flow.status = 499
    await runtime.pipeline.run("response", flow)
    return response
