"""OpenAI's own schemas of the Responses API (tests/openapi/responses.yaml): a `response` object
and a stream event, as JSON Schema validators, for checking the sidecar's translated answers."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parent / "openapi" / "responses.yaml"


def _json_schema(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true`, which the document still uses in places, as
    `anyOf [..., null]`."""
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: _json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


@cache
def validator(name: str) -> Draft202012Validator:
    """The validator of `#/components/schemas/{name}` (Response, ResponseStreamEvent)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    document = _json_schema(yaml.load(SPEC_PATH.read_text(), Loader=loader))
    resource = Resource.from_contents(document, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource("urn:openai-responses", resource)
    return Draft202012Validator(
        {"$ref": f"urn:openai-responses#/components/schemas/{name}"}, registry=registry
    )


def check_response(data: Any) -> None:
    """Raise unless `data` is a `Response` as OpenAI's document defines it."""
    validator("Response").validate(data)


def check_event(data: Any) -> None:
    """Raise unless `data` is a `ResponseStreamEvent` as OpenAI's document defines it."""
    validator("ResponseStreamEvent").validate(data)
