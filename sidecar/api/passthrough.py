"""Pass-through paths (SPEC 2.6): `passthrough:` prefixes forwarded to a provider as they are.

Every path the api listener has no route for comes here: under a configured prefix it is
forwarded, else it is the 404 that names what is served (`common.unknown_route`). A forwarded
request takes the hooks of the model endpoints that apply to it — `headers` (auth), `request`
(metrics, rate limits counting the request, user addons), `response` / `error` / `done`
(metrics, usage record, access log) — but has no model: nothing is routed, priced, budgeted or
retried. The body is streamed both ways, never parsed and never held whole (an upload is sent
as it arrives, up to `limits.max_body_bytes`; an answer, audio or SSE, as it comes).

Headers: only those in FORWARDED_REQUEST_HEADERS go up (never the client's credentials,
cookies or hop-by-hop headers), with the provider's own credentials added as its chat adapter
adds them; the answer's come back but for hop-by-hop ones, cookies, framing, the upstream's
request id and account headers, and its rate limits (the sidecar's own are the caller's).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.api.answers import ringside_headers
from sidecar.api.common import error_response, request_id, too_large, unknown_route
from sidecar.api.request_path import ended_by_shutdown
from sidecar.appkeys import STATE
from sidecar.errors import (
    GatewayError,
    internal_error,
    invalid_request,
    kept,
    server_shutting_down,
)
from sidecar.flow import Flow
from sidecar.http1 import Streamed, Upload
from sidecar.passthrough import PassthroughRoute
from sidecar.providers.openai_compat import parse_error_envelope
from sidecar.runtime import Runtime
from sidecar.upstream import redact, transport_error

log = logging.getLogger("ringside")

# request headers a pass-through forwards: what describes the body and the wanted answer
FORWARDED_REQUEST_HEADERS = frozenset(
    {"content-type", "accept", "accept-language", "openai-beta", "user-agent"}
)
# answer headers never passed back: hop-by-hop (RFC 9110 7.6.1), cookies, framing (aiohttp
# frames the answer; the body comes decoded), what aiohttp writes itself, the upstream's own
# request id (X-Request-Id is the sidecar's), and what describes the gateway's account
# rather than the caller's (its organization, project, rate limits)
DROPPED_ANSWER_HEADERS = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "trailers", "transfer-encoding", "upgrade", "set-cookie", "set-cookie2",
        "content-length", "content-encoding", "date", "server", "x-request-id",
        "openai-organization", "openai-project",
    }
)  # fmt: skip
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
ERROR_BODY_BYTES = 64 * 1024  # of an upstream error answer, read to name its code
_UNSAFE_IN_PATH = ("%2f", "%2e", "%5c", "\\")  # encoded /, . and \: a way out of the prefix


async def passthrough_or_unknown(request: web.Request) -> web.StreamResponse:
    """The api listener's last route: a pass-through path, or the 404 naming what is served."""
    runtime = request.app[STATE].runtime
    route = runtime.passthrough.match(request.path)
    if route is None:
        return await unknown_route(request, runtime.passthrough.prefixes)
    return await forward(request, runtime, route)


async def forward(
    request: web.Request, runtime: Runtime, route: PassthroughRoute
) -> web.StreamResponse:
    """Serve one pass-through request; the `error` and `done` hooks see every one."""
    flow = Flow(
        id=request_id(request),
        headers=_without_idempotency_key(request.headers),
        client_ip=request.remote or "",
        body={},
        body_bytes=0,
        path=request.path,
    )
    pipeline = runtime.pipeline
    response: web.StreamResponse
    try:
        response = flow.answer = await _process(flow, runtime, route, request)
    except GatewayError as error:
        flow.error, flow.status = kept(error), error.status
        await pipeline.run("error", flow)
        response = flow.answer = error_response(error, ringside_headers(flow))
    except asyncio.CancelledError:
        if request.writer.output_size or not ended_by_shutdown(request):
            flow.status = 499  # the client closed the connection
            raise
        shutting_down = server_shutting_down()
        flow.error, flow.status = shutting_down, shutting_down.status
        await pipeline.run("error", flow)
        response = flow.answer = error_response(shutting_down, ringside_headers(flow))
    except Exception:
        log.exception("internal error in pass-through request %s", flow.id)
        internal = internal_error(flow.id)
        flow.error, flow.status = internal, 500
        await pipeline.run("error", flow)
        response = flow.answer = error_response(internal, ringside_headers(flow))
    finally:
        flow.finished = time.perf_counter()
        await pipeline.run("done", flow)
    return response


def _without_idempotency_key(headers: CIMultiDictProxy[str]) -> CIMultiDictProxy[str]:
    """The request's headers as the hooks see them: without Idempotency-Key, which is the
    model endpoints' (SPEC 2.5): a pass-through answer is not stored and replayed."""
    if "Idempotency-Key" not in headers:
        return headers
    kept_headers = CIMultiDict(headers)
    del kept_headers["Idempotency-Key"]
    return CIMultiDictProxy(kept_headers)


async def _process(
    flow: Flow, runtime: Runtime, route: PassthroughRoute, request: web.Request
) -> web.StreamResponse:
    pipeline = runtime.pipeline
    await pipeline.run("headers", flow)  # auth: before anything of the body is read
    if flow.response is not None:
        return _addon_answer(flow)
    _check_caller(flow, runtime)
    await pipeline.run("request", flow)  # metrics, rate limits (one request; tokens unknown)
    if flow.response is not None:
        return _addon_answer(flow)
    if request.method not in METHODS:
        raise GatewayError(
            405,
            "method_not_allowed",
            f"{request.method} is not forwarded on {request.path}; pass-through paths take "
            + ", ".join(sorted(METHODS)),
            headers={"Allow": ", ".join(sorted(METHODS))},
        )
    url = route.url(*_checked_target(request))
    body = await _body(request, runtime.settings.limits.max_body_bytes)
    flow.body_bytes = len(body) if isinstance(body, bytes) else body.length
    headers = forwarded_headers(request.headers, route.headers)
    timeouts = route.provider.timeout
    started = time.perf_counter()
    try:
        answer = await runtime.services.http1.forward(
            route.egress.target_once(url),
            headers,
            body,
            timeouts.connect,
            timeouts.read,
            timeouts.total,
            request.method,
        )
    except (TimeoutError, OSError, HttpProcessingError) as exc:
        flow.upstream_seconds = time.perf_counter() - started
        gone = request.transport is None or request.transport.is_closing()
        if gone or isinstance(exc, HttpProcessingError):  # the client's upload broke off
            flow.status = 499
            return web.Response(status=499)  # nobody reads it: the access log and metrics do
        _count(runtime, route, "upstream_unavailable", flow.upstream_seconds)
        raise GatewayError(503, "upstream_unavailable", transport_error(exc).message) from None
    try:
        return await _relay(flow, runtime, route, request, answer, started)
    finally:
        answer.close()


def _addon_answer(flow: Flow) -> web.StreamResponse:
    assert flow.response is not None
    flow.status = flow.response.status
    if not flow.response.prepared:
        flow.response.headers.setdefault("X-Request-Id", flow.id)
    return flow.response


def _check_caller(flow: Flow, runtime: Runtime) -> None:
    """A caller limited to some models may not use the provider's key for anything else; in
    open mode, no browser may (a web page can post a form to a loopback sidecar)."""
    principal = flow.principal
    limits = principal.allowed or principal.token_allowed
    if limits:
        raise GatewayError(
            403,
            "passthrough_not_allowed",
            f"this key or client token may use only {', '.join(limits)}: pass-through paths "
            "need a key (or client token) without allowed models",
        )
    if runtime.settings.open_mode and "Origin" in flow.headers:
        raise GatewayError(
            403,
            "passthrough_not_allowed",
            "pass-through paths are not served to browsers while the sidecar runs without "
            "keys (open mode): configure keys and send one",
        )


def _checked_target(request: web.Request) -> tuple[str, str]:
    """The client's raw path and query, refused when they could leave the prefix upstream
    (`.`/`..` segments, encoded slashes or dots) or are not plain ASCII."""
    raw_path, raw_query = request.rel_url.raw_path, request.rel_url.raw_query_string
    segments = request.path.split("/")[1:-1]  # an empty last one: a trailing slash
    lowered = raw_path.lower()
    if (
        not raw_path.isascii()
        or not raw_query.isascii()
        or any(c in raw_query for c in " \t\r\n")
        or any(unsafe in lowered for unsafe in _UNSAFE_IN_PATH)
        or any(segment in ("", ".", "..") for segment in segments)
        or request.path.rsplit("/", 1)[-1] in (".", "..")
    ):
        raise invalid_request(
            f"the path {request.path!r} cannot be forwarded: no empty, . or .. segments, no "
            "encoded / . or \\, ASCII only"
        )
    return raw_path, raw_query


async def _body(request: web.Request, limit: int) -> bytes | Upload:
    """The request body as an Upload streamed to the upstream as it arrives (its length
    declared and within `limit`: else 413 before anything is sent); a chunked body, whose
    length is known only at its end, is read first, up to `limit`."""
    length = request.content_length
    if length is not None:
        if length > limit:
            raise too_large(limit)
        return Upload(request.content.iter_any(), length) if length else b""
    if not request.body_exists:
        return b""
    pieces: list[bytes] = []
    size = 0
    async for piece in request.content.iter_any():
        size += len(piece)
        if size > limit:
            raise too_large(limit)
        pieces.append(piece)
    return b"".join(pieces)


def forwarded_headers(client: Mapping[str, str], provider: Mapping[str, str]) -> dict[str, str]:
    """What goes upstream: the client's descriptive headers, then the provider's credentials
    and configured headers (which win)."""
    headers = {
        name: value for name, value in client.items() if name.lower() in FORWARDED_REQUEST_HEADERS
    }
    for name, value in provider.items():
        for given in [given for given in headers if given.lower() == name.lower()]:
            del headers[given]
        headers[name] = value
    return headers


def answer_headers(upstream: Mapping[str, str]) -> CIMultiDict[str]:
    """The upstream's answer headers a client may see (see DROPPED_ANSWER_HEADERS), and none
    that its `Connection` header names."""
    named = {
        token.strip().lower()
        for value in getattr(upstream, "getall", lambda _n, _d: [])("Connection", [])
        for token in value.split(",")
    }
    kept_headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lowered = name.lower()
        if lowered in DROPPED_ANSWER_HEADERS or lowered in named:
            continue
        if lowered.startswith("x-ratelimit-"):
            continue
        kept_headers.add(name, value)
    return kept_headers


async def _relay(
    flow: Flow,
    runtime: Runtime,
    route: PassthroughRoute,
    request: web.Request,
    answer: Streamed,
    started: float,
) -> web.StreamResponse:
    """The upstream's answer to the client as it arrives; an error answer (already an
    OpenAI envelope) as it is, but the provider rejecting the gateway's key (401/403: its
    text may quote that key, and the caller's own key is fine), which is a 503."""
    status = answer.status
    if status in (401, 403):
        detail = await _error_body(answer)
        flow.upstream_seconds = time.perf_counter() - started
        _count(runtime, route, "upstream_unavailable", flow.upstream_seconds)
        log.warning(
            "provider %s rejected the gateway's credentials on pass-through %s (HTTP %d): %s",
            route.provider.name, route.prefix, status,
            redact(detail.decode("utf-8", "replace")[:500], route.provider.api_key),
        )  # fmt: skip
        raise GatewayError(
            503,
            "upstream_unavailable",
            f"the provider rejected the gateway's credentials (HTTP {status}); the sidecar's "
            "log has the provider's answer",
        )
    headers = answer_headers(answer.headers)
    headers.update(ringside_headers(flow))
    response = web.StreamResponse(status=status, headers=headers)
    encoding = answer.headers.get("Content-Encoding", "identity").lower()
    declared = answer.headers.get("Content-Length")
    if encoding in ("identity", "") and declared is not None and declared.isdigit():
        response.content_length = int(declared)
    flow.stream = "text/event-stream" in answer.headers.get("Content-Type", "")
    flow.status = status
    if status >= 400:
        body = await _error_body(answer)
        flow.upstream_seconds = time.perf_counter() - started
        outcome = (
            "upstream_unavailable" if status >= 500 or status in (408, 429) else "client_fault"
        )
        _count(runtime, route, outcome, flow.upstream_seconds)
        message, code, error_type, param = parse_error_envelope(body)
        flow.error = GatewayError(
            status, code or f"upstream_http_{status}", message, param=param, error_type=error_type
        )
        await runtime.pipeline.run("error", flow)
        response.content_length = len(body)
        await response.prepare(request)
        await response.write_eof(body)
        return response
    try:
        await response.prepare(request)
        async for piece in answer.body:
            if flow.first_token_at is None:
                flow.first_token_at = time.perf_counter()
            await response.write(piece)
        await response.write_eof()
    except ConnectionResetError:
        flow.status = 499  # the client went away: the upstream connection is dropped
    except (TimeoutError, OSError) as exc:  # the upstream failed mid-answer
        flow.status = 503
        flow.error = GatewayError(503, "upstream_unavailable", transport_error(exc).message)
        if request.transport is not None:
            request.transport.close()  # the client sees the answer cut short, not complete
    finally:
        flow.upstream_seconds = time.perf_counter() - started
        outcome = "success" if flow.status < 400 or flow.status == 499 else "upstream_unavailable"
        _count(runtime, route, outcome, flow.upstream_seconds)
    await runtime.pipeline.run("response", flow)
    return response


async def _error_body(answer: Streamed) -> bytes:
    try:
        return await answer.body.read(ERROR_BODY_BYTES)
    except (TimeoutError, OSError):
        return b""


def _count(runtime: Runtime, route: PassthroughRoute, outcome: str, seconds: float) -> None:
    """`ringside_upstream_requests_total{provider, model=<prefix>, outcome}` and the
    provider's upstream time: a pass-through call has no model, its prefix stands for it
    (a bounded label: the config's prefixes)."""
    metrics = runtime.services.metrics
    provider = route.provider.name
    metrics.tally.inc(metrics.upstream_requests.labels(provider, route.prefix, outcome))
    metrics.tally.observe(metrics.upstream_duration.labels(provider), seconds)
