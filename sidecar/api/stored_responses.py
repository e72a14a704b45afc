"""GET / DELETE /v1/responses/{id}, POST /v1/responses/{id}/cancel and GET
/v1/responses/{id}/input_items: a stored response's calls, forwarded as a pass-through to the
provider that made it (sidecar/stored_responses.py says which). Any other method or path
under /v1/responses/{id} is the api listener's 404 (the catch-all)."""

from __future__ import annotations

from aiohttp import web

from sidecar.api.common import error_response, request_id
from sidecar.api.passthrough import forward
from sidecar.appkeys import STATE
from sidecar.errors import GatewayError


async def stored_response(request: web.Request) -> web.StreamResponse:
    runtime = request.app[STATE].runtime
    route = runtime.stored_route(request.match_info["id"])
    if route is None:
        error = GatewayError(
            404,
            "not_found",
            "stored responses are kept by the provider that made them, and no provider with "
            "the native Responses API (kind openai or azure) is configured",
        )
        return error_response(error, {"X-Request-Id": request_id(request)})
    return await forward(request, runtime, route)
