"""What every endpoint's answer carries: the Ringside headers, and streams sent as SSE."""

from __future__ import annotations

from aiohttp import web

from sidecar.flow import Flow

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


class SSEResponse(web.StreamResponse):
    """A stream whose head leaves with its first piece, in one write: aiohttp's own
    web.Response buffers its head this way; a StreamResponse sends it alone by default.
    (Its connection's kernel send buffer is bounded when the connection is accepted:
    sidecar/server_limits.py, SEND_BUFFER_BYTES.)"""

    _send_headers_immediately = False


def sse_response(flow: Flow) -> SSEResponse:
    return SSEResponse(headers={**SSE_HEADERS, **ringside_headers(flow)})


async def send(flow: Flow, response: web.StreamResponse, data: bytes, last: bool = False) -> None:
    """Write a piece of a stream (the `last` one with the body's end, in one write), and hand
    it to the addon that asked for a copy."""
    if flow.capture is not None:
        flow.capture.append(data)
    if last:
        await response.write_eof(data)
    else:
        await response.write(data)
