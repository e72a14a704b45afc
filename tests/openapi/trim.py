"""Trim OpenAI's OpenAPI document to one POST operation (default /chat/completions).

    python tests/openapi/trim.py path/to/openapi.yml > tests/openapi/chat-completions.yaml
    python tests/openapi/trim.py path/to/openapi.yml /embeddings > tests/openapi/embeddings.yaml

Keeps the operation (without its x-oaiMeta examples) and every schema it references,
transitively; nothing else is changed. Then add back the provenance header by hand (where the
document came from, its version and sha256) and rerun tests/test_openapi_fuzz.py.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

PATH, METHOD = "/chat/completions", "post"
PREFIX = "#/components/schemas/"


def referenced(node: Any, schemas: dict[str, Any], found: list[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(PREFIX):
            name = ref.removeprefix(PREFIX)
            if name not in found:
                found.append(name)
                referenced(schemas[name], schemas, found)
        for value in node.values():
            referenced(value, schemas, found)
    elif isinstance(node, list):
        for value in node:
            referenced(value, schemas, found)


def trim(document: dict[str, Any], path: str = PATH) -> dict[str, Any]:
    operation = {k: v for k, v in document["paths"][path][METHOD].items() if k != "x-oaiMeta"}
    schemas = document["components"]["schemas"]
    names: list[str] = []
    referenced(operation, schemas, names)
    return {
        "openapi": document["openapi"],
        "info": document["info"],
        "servers": document["servers"],
        "security": document["security"],
        "paths": {path: {METHOD: operation}},
        "components": {
            "securitySchemes": document["components"]["securitySchemes"],
            "schemas": {name: schemas[name] for name in sorted(names)},
        },
    }


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as source:
        whole = yaml.load(source, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    path = sys.argv[2] if len(sys.argv) > 2 else PATH
    trimmed = trim(whole, path)
    sys.stdout.write(yaml.safe_dump(trimmed, sort_keys=False, allow_unicode=True, width=100))
