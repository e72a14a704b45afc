"""GET /v1/models and GET /v1/models/{ref}: the catalog and the slots, precomputed per config
load (sidecar/runtime.py), behind the same auth as every model call."""

from __future__ import annotations

from aiohttp import web

from sidecar.api.common import JSON_CONTENT_TYPE, error_response, request_id
from sidecar.appkeys import STATE
from sidecar.client_tokens import cors_headers
from sidecar.errors import GatewayError
from sidecar.runtime import Runtime


async def list_models(request: web.Request) -> web.Response:
    runtime = request.app[STATE].runtime
    headers = {"X-Request-Id": request_id(request)}
    refused = _authenticate(request, runtime, headers)
    if refused is not None:
        return refused
    return web.Response(body=runtime.models_body, content_type=JSON_CONTENT_TYPE, headers=headers)


async def retrieve_model(request: web.Request) -> web.Response:
    """One entry of the list, by its ref (`fc:openai/gpt-4o-mini`, `slot:chat`); the SDKs send
    the `/` of a ref percent-encoded, which the router decodes."""
    runtime = request.app[STATE].runtime
    headers = {"X-Request-Id": request_id(request)}
    refused = _authenticate(request, runtime, headers)
    if refused is not None:
        return refused
    ref = request.match_info["ref"]
    body = runtime.model_bodies.get(ref)
    if body is None:
        shown = repr(ref[:200]) + ("…" if len(ref) > 200 else "")  # escaped: any bytes come
        error = GatewayError(
            404,
            "model_not_found",
            f"the model {shown} is not in this gateway's catalog or slots "
            "(GET /v1/models lists them)",
            param="model",
        )
        return error_response(error, headers)
    return web.Response(body=body, content_type=JSON_CONTENT_TYPE, headers=headers)


def _authenticate(
    request: web.Request, runtime: Runtime, headers: dict[str, str]
) -> web.Response | None:
    """None when the caller may read the catalog (CORS headers added for a browser's client
    token); else the error answer."""
    auth = runtime.auth
    try:
        client_ip = auth.proxies.client_ip(request.remote or "", request.headers)
        principal = auth.authenticate(request.headers, client_ip)
    except GatewayError as error:
        return error_response(error, headers)
    if principal.origin is not None:  # a browser with a client token bound to its page
        headers.update(cors_headers(principal.origin))
    return None
