"""POST /v1/client_tokens (mint a client token with an API key) and CORS preflights.

Gateway mode: a browser calls the gateway directly with a client token bound to its page's
Origin. Preflights (`OPTIONS`) carry no credentials, so they are answered for any well-formed
Origin while client tokens are enabled; what protects the gateway is the actual request: its
answer names the Origin (`Access-Control-Allow-Origin`) only when it carries a valid token bound
to that Origin, and a token used from another Origin is refused with 401.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from sidecar.addons.auth import customer_from_header
from sidecar.api.common import (
    JSON_CONTENT_TYPE,
    error_response,
    parse_json_object,
    read_body,
    request_id,
)
from sidecar.appkeys import STATE
from sidecar.client_tokens import grant_from_request, normalize_origin, token_answer
from sidecar.errors import GatewayError

MAX_BODY_BYTES = 16 * 1024
PREFLIGHT_MAX_AGE = "600"
BASE_ALLOWED_HEADERS = ("Authorization", "Content-Type", "FC-Customer", "Idempotency-Key",
                        "X-Request-Id")  # fmt: skip
MAX_REQUESTED_HEADERS = 64
_HEADER_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


async def create_client_token(request: web.Request) -> web.Response:
    runtime = request.app[STATE].runtime
    headers = {"X-Request-Id": request_id(request)}
    try:
        key = runtime.auth.api_key(request.headers)
        tokens = runtime.auth.tokens
        if tokens is None:
            raise GatewayError(
                501,
                "client_tokens_disabled",
                "client tokens are disabled on this gateway: set "
                f"{runtime.settings.tokens.secret_env} (tokens.secret_env) to a secret of at "
                "least 32 bytes",
            )
        body = parse_json_object(await read_body(request, MAX_BODY_BYTES))
        grant = grant_from_request(
            body, key, runtime.settings.tokens, customer_from_header(request.headers)
        )
        token, claims = tokens.mint(grant)
    except GatewayError as error:
        return error_response(error, headers)
    return web.Response(
        body=orjson.dumps(token_answer(token, claims)),
        content_type=JSON_CONTENT_TYPE,
        headers={**headers, "Cache-Control": "no-store"},
    )


def allowed_headers(requested: str) -> str:
    """Our headers plus the well-formed ones the browser asks for (SDKs add their own)."""
    names = list(BASE_ALLOWED_HEADERS)
    known = {name.lower() for name in names}
    for part in requested.split(",")[:MAX_REQUESTED_HEADERS]:
        name = part.strip()
        if name and name.lower() not in known and set(name) <= _HEADER_NAME_CHARS:
            known.add(name.lower())
            names.append(name)
    return ", ".join(names)


async def preflight(request: web.Request) -> web.Response:
    """CORS preflight of the endpoints a browser may call with a client token."""
    runtime = request.app[STATE].runtime
    methods = "GET, OPTIONS" if request.path.startswith("/v1/models") else "POST, OPTIONS"
    headers = {"Allow": methods}
    origin = request.headers.get("Origin")
    if origin is None or runtime.auth.tokens is None or normalize_origin(origin) is None:
        return web.Response(status=204, headers=headers)  # no CORS grant: the browser stops
    headers.update(
        {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": methods,
            "Access-Control-Allow-Headers": allowed_headers(
                request.headers.get("Access-Control-Request-Headers", "")
            ),
            "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
            "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        }
    )
    return web.Response(status=204, headers=headers)
