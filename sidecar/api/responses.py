"""POST /v1/responses: the OpenAI Responses API on the shared request path
(sidecar/api/request_path.py), answered as JSON or as Responses events (SPEC 2.6).

A candidate whose kind has the native Responses API is sent the request as the client sent it
and its answer (or its events) is forwarded; every other candidate is sent the request
translated onto its chat API (sidecar/responses_request.py) and its answer rebuilt as a
`response` object (sidecar/responses_answer.py) or as Responses events
(sidecar/responses_stream.py). `flow.body` is the chat translation, so budgets, rate limits,
schema enforcement (SPEC 2.3) and usage records treat the request as they treat chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from types import MappingProxyType
from typing import Any

import orjson
from aiohttp import web

from sidecar.api.answers import ringside_headers, send, sse_response
from sidecar.api.common import JSON_CONTENT_TYPE
from sidecar.api.request_path import ended_by_shutdown, handle
from sidecar.api.validation import requested_max_output, schema_format
from sidecar.errors import GatewayError, UpstreamError, internal_error, kept, server_shutting_down
from sidecar.flow import Flow
from sidecar.responses_answer import from_completion, response_id
from sidecar.responses_request import chat_response_format, check, to_chat
from sidecar.responses_stream import ChatEvents, NativeEvents, replay
from sidecar.routing import Estimate
from sidecar.runtime import Runtime
from sidecar.structured_stream import mentions_tool_calls, streamed_failure

log = logging.getLogger("ringside")

# what a chat-shaped error names, as a Responses request names it
PARAMS = MappingProxyType({"response_format": "text.format", "messages": "input"})


def as_responses_error(error: GatewayError) -> GatewayError:
    """`error` naming the Responses API's parameters, not those of its chat translation."""
    param = PARAMS.get(error.param or "")
    if param is None:
        return error
    message = error.message.replace("response_format", "text.format")
    return GatewayError(
        error.status,
        error.code,
        message,
        param=param,
        error_type=error.error_type,
        headers=error.headers,
    )


class Responses:
    """The Responses API request/answer shape (an `Endpoint`)."""

    format_member = "text"

    def schema_format(self, body: dict[str, Any]) -> dict[str, Any] | None:
        text = body.get("text")
        spec = text.get("format") if isinstance(text, dict) else None
        if not isinstance(spec, dict) or spec.get("type") != "json_schema":
            return None  # (the translation takes any other type for json_schema: check refuses)
        return schema_format(chat_response_format(text))

    async def check_ahead(self, flow: Flow, pace: Callable[[], Awaitable[None]]) -> None:
        """Nothing: its checks of a large body run in `prepare`, in one step."""

    def prepare(self, flow: Flow, runtime: Runtime, raw: bytes | bytearray) -> Estimate:
        check(flow.body)
        call = to_chat(flow.body)
        flow.responses = call
        flow.body = call.chat  # what budgets, limits and the schema loop read
        try:
            flow.schema_plan = runtime.services.schemas.plan(
                call.chat.get("response_format"), flow.part_sizes, flow.schema_primed
            )
        except GatewayError as error:
            raise as_responses_error(error) from None
        flow.stream = call.request.get("stream") is True
        return Estimate(prompt_tokens=len(raw) // 4, max_output=requested_max_output(call.chat))

    async def answer(
        self, flow: Flow, runtime: Runtime, request: web.Request
    ) -> web.StreamResponse:
        try:
            if flow.stream:
                return await _stream(flow, runtime, request)
            candidate, completion = await runtime.cascade.run(flow)
        except GatewayError as error:
            raise as_responses_error(error) from None
        await runtime.pipeline.run("response", flow)
        assert flow.responses is not None
        if runtime.cascade.native_responses(flow, candidate):
            runtime.remember_response(completion.body, candidate.provider.name)
            payload = (
                completion.raw if completion.raw is not None else orjson.dumps(completion.body)
            )
        else:
            payload = orjson.dumps(from_completion(flow.responses.request, completion))
        return web.Response(
            body=payload, content_type=JSON_CONTENT_TYPE, headers=ringside_headers(flow)
        )


RESPONSES = Responses()


async def create_response(request: web.Request) -> web.StreamResponse:
    return await handle(request, RESPONSES)


def _client_request(flow: Flow) -> dict[str, Any]:
    assert flow.responses is not None
    return flow.responses.request


async def _stream(flow: Flow, runtime: Runtime, request: web.Request) -> web.StreamResponse:
    cascade = runtime.cascade
    plan = flow.schema_plan
    assert flow.route is not None
    candidates = flow.route.candidates
    if plan is not None:
        flow.schema_enforced = True
        first = candidates[0] if candidates else None
        if (
            first is not None
            and not cascade.native_responses(flow, first)
            and not cascade.native_schema(first, plan.kind)
        ):
            return await _stream_buffered(flow, runtime, request)
    attempt, stream, head = await cascade.open_stream(flow)
    flow.first_token_at = time.perf_counter()
    flow.model_used = attempt.candidate.ref
    native = cascade.native_responses(flow, attempt.candidate)
    events: ChatEvents | NativeEvents = (
        NativeEvents(_client_request(flow), response_id(), int(time.time()))
        if native
        else ChatEvents(_client_request(flow), response_id(), int(time.time()))
    )
    watch = plan is not None and not native  # a translated answer is validated at its end
    tool_calls = watch and mentions_tool_calls(head)
    response = sse_response(flow)
    failure: UpstreamError | None = None
    settled = False
    try:
        await response.prepare(request)
        first_events = events.feed(head)
        if first_events:
            await send(flow, response, b"".join(first_events))
        ending: list[bytes] = []
        try:
            async for chunks in stream:
                if watch and not tool_calls:
                    tool_calls = mentions_tool_calls(chunks)
                data = b"".join(events.feed(chunks))
                del chunks
                if data:
                    await send(flow, response, data)
        except UpstreamError as error:
            failure = error
            attempt.error = kept(error)
            ending = events.fail("upstream_unavailable", error.message)
        rejected = None
        if failure is None and watch and flow.schema_plan is not None:
            rejected = streamed_failure(
                flow, attempt.candidate, flow.schema_plan, stream.content, tool_calls
            )
        if rejected is not None:
            flow.error, flow.status = rejected, rejected.status
            message = rejected.message.replace("response_format", "text.format")
            ending = events.fail(rejected.code, message)
        elif failure is None and isinstance(events, ChatEvents):
            ending = events.finish()
        # charged before the last event leaves (a native stream's own last event has passed
        # through already): a client that has the whole answer was billed for it
        settled = True
        await cascade.finish_stream(flow, attempt, stream)
        await send(flow, response, b"".join(ending), last=True)
    except ConnectionResetError:
        flow.status = 499
    except asyncio.CancelledError:
        if not (response.prepared and ended_by_shutdown(request)):
            flow.status = 499
            raise
        cut = server_shutting_down()
        flow.error, flow.status = cut, cut.status
        with contextlib.suppress(Exception):
            await send(flow, response, b"".join(events.fail(cut.code, cut.message)), last=True)
    except Exception:
        if not response.prepared:
            raise
        log.exception("internal error in stream %s", flow.id)
        internal = internal_error(flow.id)
        flow.error, flow.status = internal, 500
        with contextlib.suppress(Exception):
            await response.write(b"".join(events.fail(internal.code, internal.message)))
            await response.write_eof()
    finally:
        if not settled:
            await cascade.finish_stream(flow, attempt, stream)
        if isinstance(events, NativeEvents):
            runtime.remember_response(events.snapshot, attempt.candidate.provider.name)
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
    buffered, and only the validated answer is sent, as the events of a finished response."""
    candidate, completion = await runtime.cascade.run(flow)
    if runtime.cascade.native_responses(flow, candidate):
        final = completion.body
        runtime.remember_response(final, candidate.provider.name)
    else:
        final = from_completion(_client_request(flow), completion)
    flow.first_token_at = time.perf_counter()
    response = sse_response(flow)
    try:
        await response.prepare(request)
        await send(flow, response, b"".join(replay(final)), last=True)
    except ConnectionResetError:
        flow.status = 499
    await runtime.pipeline.run("response", flow)
    return response
