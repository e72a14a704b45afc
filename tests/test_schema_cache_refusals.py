"""A refused schema is cached, but each request gets its own exception: a raised exception keeps
its traceback, and a cached one would pin the frames (the whole body) of the request that last
raised it, for as long as the cache keeps the refusal (issue 16: 512 refusals of 400 KB bodies)."""

from __future__ import annotations

import gc
import weakref

import pytest

from sidecar.errors import GatewayError
from sidecar.schema_check import SchemaCache


class Body(dict):  # type: ignore[type-arg]
    """A request body that can be watched for being freed."""


def refuse(cache: SchemaCache, body: Body) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        cache.plan(body["response_format"])
    return caught.value


def test_a_cached_refusal_does_not_keep_the_request_that_raised_it() -> None:
    cache = SchemaCache()
    schema = {"type": "not-a-type"}  # not valid JSON Schema: compiled once, refused, cached
    response_format = {"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}}
    first_body = Body(response_format=response_format, padding="x" * 400_000)
    first = refuse(cache, first_body)
    watched = weakref.ref(first_body)
    second = refuse(cache, Body(response_format=response_format))

    assert first is not second and first.message == second.message
    assert (second.status, second.param) == (400, "response_format")
    del first, first_body
    gc.collect()
    assert watched() is None  # nothing the cache holds reaches the first request
