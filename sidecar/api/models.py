"""GET /v1/models: the catalog and the slots, precomputed per config load."""

from __future__ import annotations

from aiohttp import web

from sidecar.api.common import JSON_CONTENT_TYPE, error_response, request_id
from sidecar.appkeys import STATE
from sidecar.client_tokens import cors_headers
from sidecar.errors import GatewayError


async def list_models(request: web.Request) -> web.Response:
    runtime = request.app[STATE].runtime
    headers = {"X-Request-Id": request_id(request)}
    auth = runtime.auth
    try:
        client_ip = auth.proxies.client_ip(request.remote or "", request.headers)
        principal = auth.authenticate(request.headers, client_ip)
    except GatewayError as error:
        return error_response(error, headers)
    if principal.origin is not None:  # a browser with a client token bound to its page
        headers.update(cors_headers(principal.origin))
    return web.Response(body=runtime.models_body, content_type=JSON_CONTENT_TYPE, headers=headers)
