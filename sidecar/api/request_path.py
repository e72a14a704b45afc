"""The one request path every model endpoint takes: hooks, body, route, answer, accounting.

headers hooks → body (size, JSON) → request hooks → the endpoint's own checks → Idempotency-Key
→ route → routed hooks → the endpoint's answer (cascade, response hooks) → error hooks → done
hooks. Auth, rate limits, budgets, idempotency, metrics and usage records are addons on these
hooks, so an endpoint that takes this path is counted, limited and billed like chat. What differs
between endpoints (chat completions; embeddings and the Responses API next) is an `Endpoint`:
its request's validation and estimate, and how its answer is produced and sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from sidecar.addons.idempotency import well_formed
from sidecar.api.answers import ringside_headers
from sidecar.api.big_body import (
    SLICED_FROM_BYTES,
    measure_part,
    paced,
    parse_large_json_object,
    release,
)
from sidecar.api.common import error_response, parse_json_object, read_body, request_id
from sidecar.api.lane import Lane
from sidecar.api.validation import header_error
from sidecar.appkeys import STATE
from sidecar.errors import GatewayError, internal_error, kept, server_shutting_down
from sidecar.flow import Flow
from sidecar.routing import Estimate
from sidecar.runtime import Runtime

log = logging.getLogger("ringside")


class Endpoint(Protocol):
    """What one request/answer shape adds to the shared path."""

    # the member of a client's body that holds its response format, if the endpoint has one:
    # `prime`d when it is an object (most requests have none), and, in a large body, measured
    # in slices beforehand, `prepare` serializing it whole for its bound (sidecar/json_size.py)
    format_member: str

    def schema_format(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The json_schema `response_format` `prepare` will plan, if well formed: compiled
        beforehand, its measure off the event loop (`SchemaCache.prime`)."""
        ...

    async def check_ahead(self, flow: Flow, pace: Callable[[], Awaitable[None]]) -> None:
        """For a large body: check what `prepare` would check in one step and a long array
        makes long (chat's messages) a part at a time, `pace` awaited between parts, and
        note on `flow` what `prepare` may then skip; the first malformed one's 400."""
        ...

    def prepare(self, flow: Flow, runtime: Runtime, raw: bytes | bytearray) -> Estimate:
        """Check `flow.body` (a 400 GatewayError for the first malformed parameter), set what
        the request asks for on the Flow (`stream`, the schema plan), and estimate its size
        for routing and the budget's worst case."""
        ...

    async def answer(
        self, flow: Flow, runtime: Runtime, request: web.Request
    ) -> web.StreamResponse:
        """Run the routed request (`runtime.cascade`) and answer it, the `response` hooks
        included; a stream is sent from here, a JSON answer is returned unsent."""
        ...


async def handle(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    """Serve one request on `endpoint`: the answer, or its error in the OpenAI envelope; the
    `error` and `done` hooks see every request, whatever ended it."""
    state = request.app[STATE]
    runtime = state.runtime  # the one this request finishes with, reload or not
    lane = state.lane
    flow = Flow(
        id=request_id(request),
        headers=request.headers,
        client_ip=request.remote or "",
        body={},
        body_bytes=0,
        path=request.path,
    )
    pipeline = runtime.pipeline
    lane.requests += 1
    try:
        response = await _process(flow, runtime, request, endpoint, lane)
        flow.answer = response
        if flow.stream:
            return response
    except GatewayError as error:
        flow.error, flow.status = kept(error), error.status
        if flow.body_bytes >= SLICED_FROM_BYTES:
            await lane.turn(0)  # a large body's checks were a step: its answer another
        await pipeline.run("error", flow)
        response = error_response(error, ringside_headers(flow))
        flow.answer = response
    except asyncio.CancelledError:
        if request.writer.output_size or not ended_by_shutdown(request):
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
        try:
            await pipeline.run("done", flow)
        finally:
            lane.requests -= 1
            held = flow.body_memory
            if flow.body_bytes >= SLICED_FROM_BYTES:
                lane.large -= 1
                # in slices, once the flow is gone; its memory's share given back then
                release(flow.body, lane, held.give_back if held is not None else None)
            elif held is not None:  # refused while it was read
                held.give_back()
    return response


def ended_by_shutdown(request: web.Request) -> bool:
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


async def _process(
    flow: Flow, runtime: Runtime, request: web.Request, endpoint: Endpoint, lane: Lane
) -> web.StreamResponse:
    pipeline = runtime.pipeline
    await pipeline.run("headers", flow)
    if flow.response is not None:
        return _addon_answer(flow)
    limits = runtime.settings.limits
    length = request.content_length
    if length is None or length >= SLICED_FROM_BYTES:  # it may be large: it holds memory
        memory = request.app[STATE].body_memory.reservation(limits.max_body_memory_bytes)
        flow.body_memory = memory
        if length is not None:  # could never be held: refused before any of it is read
            memory.refuse_over(length, "its bytes")
        raw = await read_body(request, limits.max_body_bytes, memory.hold_bytes, length)
    else:
        raw = await read_body(request, limits.max_body_bytes, None, length)
    flow.body_bytes = len(raw)
    if flow.body_bytes < SLICED_FROM_BYTES:
        flow.body = parse_json_object(raw)
    else:  # in slices, on the loop's background lane: the process's other requests go first
        lane.large += 1
        # (Content-Length is exact: a large body took the branch with `memory` above)
        values = await memory.hold_parsed(raw, lane)  # what it will hold parsed, or refused
        flow.body = await parse_large_json_object(raw, lane, values)
    await pipeline.run("request", flow)
    if flow.response is not None:
        return _addon_answer(flow)
    member = endpoint.format_member
    large = flow.body_bytes >= SLICED_FROM_BYTES
    if large:  # the part the endpoint's checks serialize, measured in slices; then the checks
        flow.part_sizes = await measure_part(flow.body.get(member) if member else None, lane)
        await endpoint.check_ahead(flow, paced(lane))
        checks = lane.slicer()
    if (
        member
        and type(flow.body.get(member)) is dict
        and (schema_format := endpoint.schema_format(flow.body)) is not None
    ):
        # over a bound: `prepare` refuses it, after the checks that come before
        with contextlib.suppress(GatewayError):
            flow.schema_primed = await runtime.services.schemas.prime(
                schema_format, flow.part_sizes
            )
    estimate = endpoint.prepare(flow, runtime, raw)
    if large:  # a step of their own, charged to the lane
        flow.part_sizes = None
        await checks.turn()
    idempotency_key = request.headers.get("Idempotency-Key")
    if idempotency_key is not None and not well_formed(idempotency_key):
        raise header_error("Idempotency-Key", "must be 1-255 printable characters")
    flow.prompt_tokens_estimate = estimate.prompt_tokens
    flow.route = runtime.router.resolve(
        flow.body["model"], estimate, runtime.services.circuits.is_open
    )
    if flow.route.is_cascade:
        model = flow.body["model"]
        if flow.stream and isinstance(model, list) and len(model) > 1:
            # the client asked for both; a slot or match: cascade streams (the operator's
            # choice: it escalates until the first chunk that delivers something)
            raise GatewayError(
                400,
                "fallback_with_stream_unsupported",
                "model as an array cannot stream: send one model ref (a slot: or match: "
                "cascade streams), or set stream to false",
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
    await pipeline.run("routed", flow)
    return await endpoint.answer(flow, runtime, request)
