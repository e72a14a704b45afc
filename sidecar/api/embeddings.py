"""POST /v1/embeddings: the embeddings request/answer shape on the shared request path
(sidecar/api/request_path.py): the same refs, auth, rate limits, budgets (input tokens × input
price), usage records and metrics as chat (SPEC 2.6)."""

from __future__ import annotations

import base64
import sys
from array import array
from collections.abc import Awaitable, Callable, Iterable
from itertools import islice
from typing import Any

import orjson
from aiohttp import web

from sidecar.api.answers import ringside_headers
from sidecar.api.common import JSON_CONTENT_TYPE
from sidecar.api.request_path import handle
from sidecar.errors import invalid_request
from sidecar.flow import EMBEDDINGS, Flow
from sidecar.providers.base import Completion
from sidecar.routing import Estimate
from sidecar.runtime import Runtime

MAX_INPUTS = 2048  # OpenAI's limit of inputs per request
ENCODINGS = ("float", "base64")


def validate_embeddings_request(body: dict[str, Any], input_checked: bool = False) -> None:
    """A 400 naming the first malformed parameter (OpenAI's `input` forms: a string, an array
    of strings, an array of token ids, an array of such arrays); `input_checked`: by
    `check_input_ahead`, which found it well formed."""
    if "model" not in body:
        raise invalid_request("model is required (e.g. fc:openai/text-embedding-3-small)", "model")
    if "input" not in body:
        raise invalid_request("input is required: a string or an array of strings", "input")
    if not input_checked:
        _input(body["input"])
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in ENCODINGS:
        raise invalid_request("encoding_format must be float or base64", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise invalid_request("dimensions must be a positive integer", "dimensions")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid_request("user must be a string", "user")


_INPUT_RULE = (
    "input must be a non-empty string, an array of strings, an array of token ids, or an "
    f"array of arrays of token ids (at most {MAX_INPUTS} inputs)"
)


def _input(value: Any) -> None:
    if isinstance(value, str):
        if not value:
            raise invalid_request(_INPUT_RULE, "input")
        return
    if not isinstance(value, list) or not value or len(value) > MAX_INPUTS:
        raise invalid_request(_INPUT_RULE, "input")
    first = value[0]
    if isinstance(first, str):
        valid = all(isinstance(item, str) and item for item in value)
    elif isinstance(first, list):
        valid = all(isinstance(item, list) and item and _token_ids(item) for item in value)
    else:
        valid = _token_ids(value)
    if not valid:
        raise invalid_request(_INPUT_RULE, "input")


def _token_ids(items: Iterable[Any]) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in items)


_BATCH = 1024  # token ids checked between two looks at the clock (~20-100 µs)


async def check_input_ahead(body: dict[str, Any], pace: Callable[[], Awaitable[None]]) -> bool:
    """Check a large body's `input` of token-id arrays `_BATCH` ids at a time, `pace` awaited
    between batches: ~0.1 µs an id, so 300,000 of them (OpenAI's most in one request) were one
    step of ~20-30 ms. (Every other form is an array of at most 2,048 items: checked at once.)
    The same 400 when malformed; True when well formed (`validate_embeddings_request` then
    skips it), False when there is nothing to check ahead (it answers, in its order)."""
    value = body.get("input")
    if (
        "model" not in body
        or not isinstance(value, list)
        or not value
        or len(value) > MAX_INPUTS
        or not isinstance(value[0], list)
    ):
        return False
    if not all(isinstance(item, list) and item for item in value):
        raise invalid_request(_INPUT_RULE, "input")
    for ids in value:
        for start in range(0, len(ids), _BATCH):
            if not _token_ids(islice(ids, start, start + _BATCH)):
                raise invalid_request(_INPUT_RULE, "input")
            await pace()
    return True


def as_base64(completion: Completion) -> bytes:
    """The answer with every float vector as base64 of little-endian float32s, as OpenAI
    sends `encoding_format: base64` (for a kind that can only send floats)."""
    body = completion.body
    for item in body.get("data") or ():
        vector = item.get("embedding") if isinstance(item, dict) else None
        if isinstance(vector, list):
            packed = array("f", vector)
            if sys.byteorder != "little":
                packed.byteswap()
            item["embedding"] = base64.b64encode(packed.tobytes()).decode("ascii")
    return orjson.dumps(body)


class Embeddings:
    """The embeddings request/answer shape (an `Endpoint`)."""

    format_member = ""

    def schema_format(self, body: dict[str, Any]) -> dict[str, Any] | None:
        return None

    async def check_ahead(self, flow: Flow, pace: Callable[[], Awaitable[None]]) -> None:
        flow.checked_ahead = await check_input_ahead(flow.body, pace)

    def prepare(self, flow: Flow, runtime: Runtime, raw: bytes | bytearray) -> Estimate:
        validate_embeddings_request(flow.body, flow.checked_ahead)
        flow.endpoint = EMBEDDINGS
        # every byte of the request a token at most: the budget's bound; routing's estimate
        return Estimate(prompt_tokens=len(raw) // 4, max_output=0)

    async def answer(
        self, flow: Flow, runtime: Runtime, request: web.Request
    ) -> web.StreamResponse:
        _candidate, completion = await runtime.cascade.run(flow)
        await runtime.pipeline.run("response", flow)
        wants_base64 = flow.body.get("encoding_format") == "base64"
        if wants_base64 and _has_float_vectors(completion):
            payload = as_base64(completion)
        elif completion.raw is not None:
            payload = completion.raw
        else:
            payload = orjson.dumps(completion.body)
        return web.Response(
            body=payload, content_type=JSON_CONTENT_TYPE, headers=ringside_headers(flow)
        )


def _has_float_vectors(completion: Completion) -> bool:
    data = completion.body.get("data")
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        return False
    return isinstance(data[0].get("embedding"), list)


EMBEDDINGS_ENDPOINT = Embeddings()


async def create_embeddings(request: web.Request) -> web.StreamResponse:
    return await handle(request, EMBEDDINGS_ENDPOINT)
