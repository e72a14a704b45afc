"""POST /v1/chat/completions: the HTTP edge of the pipeline, JSON and SSE."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
from aiohttp import web

from sidecar import sse
from sidecar.addons.idempotency import well_formed
from sidecar.api.common import (
    JSON_CONTENT_TYPE,
    error_response,
    parse_json_object,
    read_body,
    request_id,
)
from sidecar.api.validation import header_error, requested_max_output, validate_chat_request
from sidecar.appkeys import STATE
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

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def format_usd(value: float) -> str:
    text = f"{value:.10f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def ringside_headers(flow: Flow) -> dict[str, str]:
    headers = {"X-Request-Id": flow.id}
    if flow.extra_headers:  # rate-limit state, CORS: set by addons, on every answer
        headers.update(flow.extra_headers)
    if flow.route is None:
        return headers
    if flow.model_used is not None:
        headers["X-Ringside-Model-Used"] = flow.model_used
    headers["X-Ringside-Models-Tried"] = ",".join(flow.models_tried)
    headers["X-Ringside-Fallback-Triggered"] = "true" if flow.fallback_triggered else "false"
    if flow.attempts and flow.priced and not flow.stream:
        headers["X-Ringside-Cost-USD"] = format_usd(flow.cost_usd)
    remaining = flow.budget_remaining_usd  # set by the budget addon
    if remaining is not None:
        headers["X-Ringside-Budget-Remaining-USD"] = format_usd(remaining)
    if flow.schema_enforced:
        headers["X-Ringside-Schema-Reprompts"] = str(flow.reprompts)
    return headers


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, request.app[STATE].runtime)


async def _handle(request: web.Request, runtime: Runtime) -> web.StreamResponse:
    flow = Flow(
        id=request_id(request),
        runtime=runtime,
        headers=request.headers,
        client_ip=request.remote or "",
        body={},
        body_bytes=0,
    )
    pipeline = runtime.pipeline
    try:
        response = await _process(flow, request)
        flow.answer = response
        if flow.stream:
            return response
    except GatewayError as error:
        flow.error, flow.status = kept(error), error.status
        await pipeline.run("error", flow)
        response = error_response(error, ringside_headers(flow))
        flow.answer = response
    except asyncio.CancelledError:
        if request.writer.output_size or not _ended_by_shutdown(request):
            flow.status = 499  # client closed the connection
            raise
        shutting_down = server_shutting_down()
        flow.error, flow.status = shutting_down, shutting_down.status
        await pipeline.run("error", flow)
        response = error_response(shutting_down, ringside_headers(flow))
        flow.answer = response
    except Exception:
        log.exception("internal error in request %s", flow.id)
        internal = internal_error(flow.id)
        flow.error, flow.status = internal, 500
        await pipeline.run("error", flow)  # observing hooks: they never raise (pipeline.py)
        response = error_response(internal, ringside_headers(flow))
    finally:
        flow.finished = time.perf_counter()
        await pipeline.run("done", flow)
    return response


def _ended_by_shutdown(request: web.Request) -> bool:
    """Whether the cancel being handled is the shutdown's, once its grace ran out (not the
    client going away): then the task is un-cancelled, to answer (sidecar/shutdown.py)."""
    if not request.app[STATE].grace_over or request.transport is None:
        return False
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return True


def _addon_answer(flow: Flow) -> web.StreamResponse:
    """An addon answered: log and count it with its own status."""
    assert flow.response is not None
    flow.status = flow.response.status
    if not flow.response.prepared:
        flow.response.headers.setdefault("X-Request-Id", flow.id)
    return flow.response


async def _process(flow: Flow, request: web.Request) -> web.StreamResponse:
    runtime = flow.runtime
    settings = runtime.settings
    await runtime.pipeline.run("headers", flow)
    if flow.response is not None:
        return _addon_answer(flow)
    raw = await read_body(request, settings.limits.max_body_bytes)
    flow.body_bytes = len(raw)
    body: dict[str, Any] = parse_json_object(raw)
    flow.body = body
    await runtime.pipeline.run("request", flow)
    if flow.response is not None:
        return _addon_answer(flow)
    validate_chat_request(body)
    flow.schema_plan = runtime.services.schemas.plan(body.get("response_format"))
    flow.stream = body.get("stream") is True
    idempotency_key = request.headers.get("Idempotency-Key")
    if idempotency_key is not None and not well_formed(idempotency_key):
        raise header_error("Idempotency-Key", "must be 1-255 printable characters")

    estimate = Estimate(prompt_tokens=len(raw) // 4, max_output=requested_max_output(body))
    flow.prompt_tokens_estimate = estimate.prompt_tokens
    flow.route = runtime.router.resolve(body["model"], estimate, runtime.services.circuits.is_open)
    if flow.route.is_cascade:
        if flow.stream:
            raise GatewayError(
                400,
                "fallback_with_stream_unsupported",
                "a cascade (model as an array, or a slot/match: with several models) cannot "
                "stream: send one model ref, or set stream to false",
                param="stream",
            )
        if idempotency_key is not None:
            raise GatewayError(
                400,
                "fallback_with_idempotency_unsupported",
                "a cascade (model as an array, or a slot/match: with several models) cannot "
                "be combined with Idempotency-Key: send one model ref, or drop the header",
                param="model",
            )
    await runtime.pipeline.run("routed", flow)
    if flow.stream:
        return await _stream(flow, request)

    _candidate, completion = await runtime.cascade.run(flow)
    await runtime.pipeline.run("response", flow)
    payload = completion.raw if completion.raw is not None else orjson.dumps(completion.body)
    return web.Response(
        body=payload, content_type=JSON_CONTENT_TYPE, headers=ringside_headers(flow)
    )


class SSEResponse(web.StreamResponse):
    """A stream whose head leaves with its first piece, in one write: aiohttp's own
    web.Response buffers its head this way; a StreamResponse sends it alone by default.
    (Its connection's kernel send buffer is bounded when the connection is accepted:
    sidecar/server_limits.py, SEND_BUFFER_BYTES.)"""

    _send_headers_immediately = False


async def _send(flow: Flow, response: web.StreamResponse, data: bytes, last: bool = False) -> None:
    """Write a piece of a stream (the `last` one with the body's end, in one write), and hand
    it to the addon that asked for a copy."""
    if flow.capture is not None:
        flow.capture.append(data)
    if last:
        await response.write_eof(data)
    else:
        await response.write(data)


async def _stream(flow: Flow, request: web.Request) -> web.StreamResponse:
    cascade = flow.runtime.cascade
    watch = flow.schema_plan is not None  # validate the streamed answer at its end
    if watch:
        flow.schema_enforced = True
        assert flow.route is not None
        if flow.route.candidates and not cascade.native_schema(flow.route.candidates[0]):
            return await _stream_buffered(flow, request)
    attempt, stream = await cascade.open_stream(flow)
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        first = []
    except UpstreamError as error:
        await cascade.fail_stream(flow, attempt, stream, error)
        raise cascade.as_gateway_error(attempt.candidate, error, flow) from None
    except BaseException:
        await cascade.finish_stream(flow, attempt, stream)
        raise
    flow.first_token_at = time.perf_counter()
    flow.model_used = attempt.candidate.ref
    response = SSEResponse(headers={**SSE_HEADERS, **ringside_headers(flow)})
    failure: UpstreamError | None = None
    tool_calls = watch and mentions_tool_calls(first)
    try:
        await response.prepare(request)
        if first:
            await _send(flow, response, b"".join(sse.encode(chunk) for chunk in first))
        try:
            async for chunks in stream:
                if watch and not tool_calls:
                    tool_calls = mentions_tool_calls(chunks)
                data = b"".join(sse.encode(chunk) for chunk in chunks)
                # not held while the write waits for a slow client: a chunk an adapter
                # re-encoded holds 4 KiB or more (orjson does not trim its output buffer)
                del chunks
                await _send(flow, response, data)
        except UpstreamError as error:
            failure = error
            attempt.error = kept(error)
            envelope = GatewayError(503, "upstream_unavailable", error.message).envelope()
            await _send(flow, response, sse.encode(orjson.dumps(envelope)), last=True)
        rejected = None
        if failure is None and flow.schema_plan is not None:
            rejected = streamed_failure(
                flow, attempt.candidate, flow.schema_plan, stream.content, tool_calls
            )
        if rejected is not None:
            flow.error, flow.status = rejected, rejected.status
            await _send(flow, response, sse.encode(rejected.body()), last=True)
        elif failure is None:
            await _send(flow, response, sse.DONE, last=True)
    except ConnectionResetError:
        flow.status = 499  # the client went away mid-stream: nothing more to send
    except asyncio.CancelledError:
        if not (response.prepared and _ended_by_shutdown(request)):
            flow.status = 499
            raise
        cut = server_shutting_down()  # the stream ends as an upstream failure would end it
        flow.error, flow.status = cut, cut.status
        with contextlib.suppress(Exception):
            await _send(flow, response, sse.encode(cut.body()), last=True)
    except Exception:
        if not response.prepared:
            raise
        # headers are out: the only honest answer left is an SSE error event that ends the stream
        log.exception("internal error in stream %s", flow.id)
        internal = internal_error(flow.id)
        flow.error, flow.status = internal, 500
        with contextlib.suppress(Exception):
            await response.write(sse.encode(internal.body()))
            await response.write_eof()
    finally:
        await cascade.finish_stream(flow, attempt, stream)
        if failure is not None:
            flow.error = GatewayError(503, "upstream_unavailable", failure.message)
            if flow.status != 499:
                flow.status = 503
    await flow.runtime.pipeline.run("response", flow)
    return response


async def _stream_buffered(flow: Flow, request: web.Request) -> web.StreamResponse:
    """Structured output from a provider without native support: the re-prompt loop runs
    buffered, and only the validated answer is streamed, as OpenAI chunks."""
    _candidate, completion = await flow.runtime.cascade.run(flow)
    options = flow.body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    chunks = completion_chunks(completion, include_usage)
    flow.first_token_at = time.perf_counter()
    response = SSEResponse(headers={**SSE_HEADERS, **ringside_headers(flow)})
    try:
        await response.prepare(request)
        body = b"".join(sse.encode(chunk) for chunk in chunks) + sse.DONE
        await _send(flow, response, body, last=True)
    except ConnectionResetError:
        flow.status = 499
    await flow.runtime.pipeline.run("response", flow)
    return response
