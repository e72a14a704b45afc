"""What every API handler shares: app keys, request ids, body reading, error responses."""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable, Sequence

import orjson
from aiohttp import web

from sidecar.errors import GatewayError, invalid_request
from sidecar.ids import new_id

JSON_CONTENT_TYPE = "application/json"
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id")
    if given is not None and _REQUEST_ID.match(given):
        return given
    return "req_" + new_id()


async def read_body(
    request: web.Request,
    limit: int,
    hold: Callable[[int], Awaitable[None]] | None = None,
    length: int | None = None,
) -> bytes | bytearray:
    """The request body, or 413 as soon as it is known to be over `limit` bytes
    (415 when it is declared as something else than JSON: see `require_json`). A body that
    comes in several reads is gathered as it comes: joined at the end, megabytes were one step
    of the loop (~1 ms a MB, most of it the new buffer's first touch). `hold` is told the
    body's size in bytes as it arrives (not what Content-Length promises: a client that sends
    slowly, or never, would hold it without sending it); it raises to refuse the body
    (sidecar/api/body_memory.py). `length`: the request's
    Content-Length when the caller has read it already."""
    if request.headers.get("Content-Type") != JSON_CONTENT_TYPE:  # what the SDKs send
        require_json(request)
    if length is None:
        length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit)
    content = request.content
    if content.is_eof():  # a small body arrives with the headers: it is all buffered already
        whole = content.read_nowait()
        if len(whole) > limit:
            raise too_large(limit)
        if hold is not None:
            await hold(len(whole))
        return whole
    gathered = bytearray()
    # one read at a time as it came (iter_any joins what is buffered: one more copy)
    async for chunk, _end_of_http_chunk in request.content.iter_chunks():
        size = len(gathered) + len(chunk)
        if size > limit:
            raise too_large(limit)
        if hold is not None:
            await hold(size)
        gathered += chunk
    return gathered


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        "request_too_large",
        f"the request body is over the {limit}-byte limit (limits.max_body_bytes)",
    )


def require_json(request: web.Request) -> None:
    """415 unless the body is declared as JSON (`application/json`, any `…/…+json`) or not
    declared at all (curl without -H; OpenAI's SDKs always declare it).

    Refused: the types a browser may send cross-site without asking first (text/plain, forms),
    and an undeclared body from a browser (it sends `Origin`): so that no web page can make a
    visitor's browser call a sidecar on their machine (open mode on loopback)."""
    declared = request.headers.get("Content-Type")  # read_body took what the SDKs send
    if declared is None:
        if "Origin" not in request.headers:
            return
    else:
        media_type = declared.partition(";")[0].strip().lower()
        if media_type == JSON_CONTENT_TYPE or (
            media_type.endswith("+json") and media_type.count("/") == 1
        ):
            return
    raise GatewayError(
        415,
        "unsupported_media_type",
        f"the request body must be JSON, sent with Content-Type: {JSON_CONTENT_TYPE} "
        f"(got {declared or 'none, from a browser'})",
        error_type="invalid_request_error",
    )


# How deeply JSON in a request may nest: far deeper than any real request (a tool's JSON Schema
# ten objects deep is about 25 levels), and far from where the rest of the sidecar breaks:
# orjson re-encodes at most 254 levels for the upstream (and the Python jsonschema this check was
# first written against ran out of stack on a response_format schema past about 120).
MAX_JSON_DEPTH = 64
_ORJSON_MAX_DEPTH = 254  # orjson.dumps: "Recursion limit reached" past this (a test pins it)
_COUNT_BELOW_BYTES = 2048  # up to here counting brackets costs less than the probe (~5 us)


class _Hole:
    """Where the body goes in `_DEPTH_PROBE`: orjson asks `default` what to write for it."""


def _nested(levels: int) -> object:
    inner: object = _Hole()
    for _ in range(levels):
        inner = [inner]  # lists: orjson writes them faster than tuples; never changed
    return inner


# The body, written inside this many arrays, fits orjson's depth only if it nests at most
# MAX_JSON_DEPTH levels: the check is one orjson.dumps, in C, never a walk in Python.
_DEPTH_PROBE = _nested(_ORJSON_MAX_DEPTH - MAX_JSON_DEPTH)


def parse_json_object(raw: bytes | bytearray) -> dict[str, object]:
    if not raw:
        raise invalid_request("the request body is empty: send a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid_request("the request body must be a JSON object")
    if len(raw) > _COUNT_BELOW_BYTES or raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:
        try:
            orjson.dumps(_DEPTH_PROBE, default=lambda _hole: body)
        except orjson.JSONEncodeError:  # what orjson parsed it can write, but for the depth
            raise too_deep() from None
    return body


def fits_depth_at(value: object, level: int) -> bool:
    """Whether `value`, standing at `level` of a body (the body itself is level 1), nests no
    deeper than MAX_JSON_DEPTH levels counted from the body: the check of `parse_json_object`
    on a part of a body (sidecar/api/big_body.py checks a large one a part at a time)."""
    if level > len(_PROBES):
        return False
    try:
        orjson.dumps(_PROBES[level - 1], default=lambda _hole: value)
    except orjson.JSONEncodeError:
        return False
    return True


def _probes() -> tuple[object, ...]:
    """`_DEPTH_PROBE` for a value at each level of a body: one array more around it a level."""
    probes = [_DEPTH_PROBE]
    while len(probes) <= MAX_JSON_DEPTH:
        probes.append([probes[-1]])
    return tuple(probes)


_PROBES = _probes()  # levels 1 to MAX_JSON_DEPTH + 1


def too_deep() -> GatewayError:
    return invalid_request(
        f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels "
        f"deep: at most {MAX_JSON_DEPTH} are accepted"
    )


def bearer_matches(request: web.Request, expected: bytes) -> bool:
    """Whether `Authorization: Bearer <token>` carries `expected`, compared in constant time.

    Any other header (absent, another scheme, huge, not ASCII) is False, never an exception."""
    scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # surrogatepass: a header's undecodable bytes arrive as surrogates; any str encodes
    return hmac.compare_digest(given.strip().encode("utf-8", "surrogatepass"), expected)


def error_response(error: GatewayError, headers: dict[str, str]) -> web.Response:
    return web.Response(
        status=error.status,
        body=error.body(),
        content_type=JSON_CONTENT_TYPE,
        headers={**headers, **error.headers},
    )


_METHODS = {
    "/v1/chat/completions": "POST, OPTIONS",
    "/v1/embeddings": "POST, OPTIONS",
    "/v1/models": "GET, OPTIONS",
    "/v1/models/{ref}": "GET, OPTIONS",
    "/v1/client_tokens": "POST",
}


async def unknown_route(request: web.Request, passthrough: Sequence[str] = ()) -> web.Response:
    """Anything the API does not serve, answered in the OpenAI envelope (never aiohttp's text);
    a 404 names the configured pass-through prefixes too."""
    headers = {"X-Request-Id": request_id(request)}
    path = request.path
    allowed = _METHODS.get("/v1/models/{ref}" if path.startswith("/v1/models/") else path)
    if allowed is not None:
        error = GatewayError(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.path}; use {allowed.split(',')[0]}",
            headers={"Allow": allowed},
        )
    else:
        error = GatewayError(
            404,
            "not_found",
            f"no such endpoint: {request.method} {request.path} "
            "(the API serves POST /v1/chat/completions, POST /v1/embeddings, GET /v1/models "
            "and GET /v1/models/{ref}"
            + (f"; passed through to providers: {', '.join(passthrough)}" if passthrough else "")
            + ")",
        )
    return error_response(error, headers)
