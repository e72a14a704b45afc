"""A tool call's arguments for the mock provider: the smallest plain JSON value that a tool's
parameter schema accepts, built by one bounded walk of the schema.

No library does this deterministically and cheaply (hypothesis-jsonschema draws random values
and is built for tests), and the schema is a client's: the walk follows local `$ref`s only, at
most MAX_DEPTH levels deep and MAX_NODES schema nodes in all, so a hostile schema costs
microseconds, not the event loop. What it cannot satisfy (`not`, conflicting bounds, patterns it
cannot guess) it answers with a value of the right type: the mock is for demos and tests of
tool-using clients, whose schemas are plain (Pydantic models, OpenAI function examples).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

MAX_DEPTH = 16
MAX_NODES = 2000

_FORMAT_EXAMPLES: Mapping[str, str] = MappingProxyType(
    {
        "date-time": "2024-01-01T00:00:00Z",
        "date": "2024-01-01",
        "time": "00:00:00Z",
        "email": "user@example.com",
        "uri": "https://example.com",
        "url": "https://example.com",
        "uuid": "00000000-0000-4000-8000-000000000000",
        "ipv4": "192.0.2.1",
        "ipv6": "2001:db8::1",
        "hostname": "example.com",
        "duration": "P1D",
    }
)


class _Walk:
    __slots__ = ("nodes", "root")

    def __init__(self, root: Any) -> None:
        self.root = root
        self.nodes = 0

    def value(self, schema: Any, depth: int) -> Any:
        self.nodes += 1
        if depth > MAX_DEPTH or self.nodes > MAX_NODES or not isinstance(schema, dict):
            return {} if depth == 0 else None
        if "$ref" in schema:
            target = self._resolve(schema["$ref"])
            if target is not None:
                return self.value(target, depth + 1)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[0]
        if "default" in schema:
            return schema["default"]
        examples = schema.get("examples")
        if isinstance(examples, list) and examples:
            return examples[0]
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                # prefer a branch that is not `null`: Optional[X] gives X
                chosen = next(
                    (o for o in options if not (isinstance(o, dict) and o.get("type") == "null")),
                    options[0],
                )
                return self.value(chosen, depth + 1)
        all_of = schema.get("allOf")
        if isinstance(all_of, list) and all_of:
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in all_of:
                if isinstance(part, dict):
                    part = self._resolve(part["$ref"]) or part if "$ref" in part else part
                    _merge(merged, part)
            return self.value(merged, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
        if kind is None:
            kind = _implied_type(schema)
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "string":
            return _string(schema)
        if kind == "integer":
            return int(_number(schema, integer=True))
        if kind == "number":
            return _number(schema, integer=False)
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        return {} if depth == 0 else "example"

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        names = [n for n in required if isinstance(n, str)] if isinstance(required, list) else []
        out: dict[str, Any] = {}
        for name in names:
            out[name] = self.value(properties.get(name, {}), depth + 1)
        minimum = schema.get("minProperties")
        for name, sub in properties.items():  # optional ones, up to minProperties
            if not isinstance(minimum, int) or len(out) >= minimum:
                break
            if name not in out:
                out[name] = self.value(sub, depth + 1)
        return out

    def _array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        items: list[Any] = []
        if isinstance(prefix, list):
            items = [self.value(sub, depth + 1) for sub in prefix]
        wanted = schema.get("minItems")
        wanted = min(wanted, 8) if isinstance(wanted, int) and wanted > 0 else 0
        item_schema = schema.get("items", {})
        while len(items) < wanted:
            items.append(self.value(item_schema, depth + 1))
        if schema.get("uniqueItems") is True and len(items) > 1:
            items = items[:1]  # equal generated items would break uniqueness
        return items

    def _resolve(self, ref: Any) -> Any:
        """A local `#/...` reference in the root schema; None for anything else (remote refs
        are never fetched)."""
        if not isinstance(ref, str) or not ref.startswith("#"):
            return None
        node: Any = self.root
        for part in ref[1:].split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node


def _merge(into: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        if key == "properties" and isinstance(value, dict):
            into.setdefault("properties", {}).update(value)
        elif key == "required" and isinstance(value, list):
            into["required"] = [*into.get("required", []), *value]
        else:
            into.setdefault(key, value)


def _implied_type(schema: dict[str, Any]) -> str | None:
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    if "minLength" in schema or "pattern" in schema or "format" in schema:
        return "string"
    if "minimum" in schema or "maximum" in schema:
        return "number"
    return None


def _string(schema: dict[str, Any]) -> str:
    text = _FORMAT_EXAMPLES.get(schema.get("format", ""), "example")
    minimum = schema.get("minLength")
    if isinstance(minimum, int) and len(text) < minimum:
        text += "x" * (min(minimum, 4096) - len(text))
    maximum = schema.get("maxLength")
    if isinstance(maximum, int) and maximum >= 0 and len(text) > maximum:
        text = text[:maximum]
    return text


def _number(schema: dict[str, Any], integer: bool) -> float:
    low, high = schema.get("minimum"), schema.get("maximum")
    low_x, high_x = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    value: float = 1
    if isinstance(low, int | float) and not isinstance(low, bool):
        value = max(value, low)
    if isinstance(low_x, int | float) and not isinstance(low_x, bool) and value <= low_x:
        value = low_x + 1 if integer else low_x + 0.5
    if isinstance(high, int | float) and not isinstance(high, bool) and value > high:
        value = high
    if isinstance(high_x, int | float) and not isinstance(high_x, bool) and value >= high_x:
        value = high_x - 1 if integer else high_x - 0.5
    multiple = schema.get("multipleOf")
    if isinstance(multiple, int | float) and not isinstance(multiple, bool) and multiple > 0:
        value = multiple * max(1, -(-value // multiple))
    return value


def example_arguments(parameters: Any) -> dict[str, Any]:
    """Arguments (a JSON object) that the tool's `parameters` schema accepts."""
    value = _Walk(parameters).value(parameters, 0)
    return value if isinstance(value, dict) else {}
