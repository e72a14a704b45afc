"""GET /v1/models: the catalog and the slots, precomputed per config load."""

from __future__ import annotations

from aiohttp import web

from sidecar.api.common import JSON_CONTENT_TYPE, error_response, request_id
from sidecar.app import STATE
from sidecar.errors import GatewayError


async def list_models(request: web.Request) -> web.Response:
    runtime = request.app[STATE].runtime
    headers = {"X-Request-Id": request_id(request)}
    try:
        runtime.auth.authenticate(request.headers)
    except GatewayError as error:
        return error_response(error, headers)
    return web.Response(body=runtime.models_body, content_type=JSON_CONTENT_TYPE, headers=headers)
