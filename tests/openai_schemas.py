"""OpenAI's own schemas (its OpenAPI document, trimmed per operation in tests/openapi/) as JSON
Schema validators, for checking the sidecar's answers: a `response` object and a Responses stream
event (responses.yaml), an embeddings answer (embeddings.yaml)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

DOCUMENTS = Path(__file__).resolve().parent / "openapi"


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
def validator(name: str, document: str = "responses.yaml") -> Draft202012Validator:
    """The validator of `#/components/schemas/{name}` of a trimmed document of OpenAI's."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    contents = _json_schema(yaml.load((DOCUMENTS / document).read_text(), Loader=loader))
    resource = Resource.from_contents(contents, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource("urn:openai", resource)
    return Draft202012Validator(
        {"$ref": f"urn:openai#/components/schemas/{name}"}, registry=registry
    )


def check_response(data: Any) -> None:
    """Raise unless `data` is a `Response` as OpenAI's document defines it."""
    validator("Response").validate(data)


def check_event(data: Any) -> None:
    """Raise unless `data` is a `ResponseStreamEvent` as OpenAI's document defines it."""
    validator("ResponseStreamEvent").validate(data)


def check_embeddings(data: Any) -> None:
    """Raise unless `data` is a `CreateEmbeddingResponse` as OpenAI's document defines it (float
    vectors: the document has no form for base64 ones)."""
    validator("CreateEmbeddingResponse", "embeddings.yaml").validate(data)
