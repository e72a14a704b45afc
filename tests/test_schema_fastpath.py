"""The compiled check of our own schemas (the config's) agrees with jsonschema (Draft 2020-12).

Client schemas (`response_format`) are checked by jsonschema-rs: see test_schema_budget.py.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from pydantic import BaseModel

from sidecar.schema_compiler import ASSERTIONS, compile_predicate
from sidecar.settings.reading import _valid_config, _validator

FORMATS = Draft202012Validator.FORMAT_CHECKER


class Line(BaseModel):
    sku: str
    quantity: int
    note: str | None


class Order(BaseModel):
    id: str
    lines: list[Line]
    parent: Order | None


SCHEMAS: dict[str, Any] = {
    "pydantic-recursive": Order.model_json_schema(),
    "types": {"type": ["integer", "null"]},
    "number-bounds": {"type": "number", "minimum": 0, "exclusiveMaximum": 10},
    "exclusive-min": {"exclusiveMinimum": 1.5, "maximum": 3},
    "strings": {"type": "string", "minLength": 2, "maxLength": 4, "pattern": "^[a-z]+$"},
    "formats": {
        "type": "object",
        "properties": {
            "when": {"type": "string", "format": "date-time"},
            "day": {"format": "date"},
            "mail": {"format": "email"},
            "ip": {"format": "ipv4"},
            "custom": {"format": "no-such-format"},
        },
    },
    "enum-mixed": {"enum": ["a", 1, True, None, 2.5]},
    "const-false": {"const": False},
    "const-one": {"const": 1},
    "objects": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
        "required": ["a"],
        "additionalProperties": {"type": "boolean"},
        "minProperties": 1,
        "maxProperties": 3,
    },
    "closed-object": {"properties": {"a": True}, "additionalProperties": False},
    "arrays": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "no-items-allowed": {"type": "array", "items": False},
    "combinators": {
        "anyOf": [{"type": "string"}, {"type": "integer", "minimum": 5}],
        "not": {"const": "forbidden"},
    },
    "one-of": {"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 2}]},
    "all-of": {"allOf": [{"minimum": 1}, {"maximum": 5}]},
    "ref-with-siblings": {
        "$defs": {"pos": {"type": "integer", "minimum": 0}},
        "$ref": "#/$defs/pos",
        "maximum": 9,
    },
    "escaped-ref": {"$defs": {"a/b": {"type": "string"}}, "items": {"$ref": "#/$defs/a~1b"}},
    "property-names": {"type": "object", "propertyNames": {"pattern": "^[a-c]$", "maxLength": 1}},
    "unknown-keywords-ignored": {"type": "object", "x-vendor": {"type": "string"}, "nullable": 1},
    "true": True,
    "false": False,
}

INSTANCES: list[Any] = [
    None, True, False, 0, 1, 1.0, 1.5, 2, 2.5, 3, 4.0, 5, 7, 9, 10, 12, -1, "", "a", "ab", "abcd",
    "abcde", "AB", "forbidden", [], [1], [1, 2, 3], [1, 2, 3, 4], [1.0, "x"], {}, {"a": 1},
    {"a": 1.0, "b": "x"}, {"a": True}, {"a": 1, "c": True}, {"a": 1, "c": 3}, {"b": "x"},
    {"a": 1, "b": "x", "c": False, "d": True},
    {"when": "2026-01-02T03:04:05Z", "day": "2026-02-30", "mail": "a@b", "ip": "1.2.3.4"},
    {"when": "yesterday", "day": "2026-01-31", "mail": "nobody", "ip": "999.1.1.1"},
    {"custom": "anything"},
    {"id": "o1", "lines": [], "parent": None},
    {"id": "o1", "lines": [{"sku": "s", "quantity": 2, "note": None}], "parent": None},
    {"id": "o1", "lines": [{"sku": "s", "quantity": 2.0, "note": "n"}],
     "parent": {"id": "o0", "lines": [], "parent": None}},
    {"id": "o1", "lines": [{"sku": "s", "quantity": "2", "note": None}], "parent": None},
    {"id": "o1", "lines": [], "parent": {"id": "o0", "lines": [], "parent": {"id": 3}}},
    {"id": "o1", "lines": [], "parent": None, "extra": 1},
    {"id": "o1", "lines": []},
    ["a", "b"], [["x"]],
]  # fmt: skip


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_fast_path_agrees_with_jsonschema(name: str) -> None:
    schema = SCHEMAS[name]
    Draft202012Validator.check_schema(schema)
    fast = compile_predicate(schema, FORMATS)
    assert fast is not None, f"{name} should be compiled"
    reference = Draft202012Validator(schema, format_checker=FORMATS)
    disagreements = [
        instance for instance in INSTANCES if fast(instance) != reference.is_valid(instance)
    ]
    assert disagreements == []


@pytest.mark.parametrize(
    "schema",
    [
        {"patternProperties": {"^x": {"type": "string"}}},
        {"uniqueItems": True},
        {"multipleOf": 0.1},
        {"prefixItems": [{"type": "string"}]},
        {"if": {"type": "string"}, "then": {"minLength": 2}},
        {"unevaluatedProperties": False},
        {"enum": [[1], {"a": 1}]},
        {"$defs": {"a": {"$id": "other", "type": "string"}}, "$ref": "#/$defs/a"},
        {"$defs": {"a": {"$anchor": "x"}}, "$ref": "#x"},
        {"$ref": "https://json-schema.org/draft/2020-12/schema"},
    ],
    ids=lambda schema: next(iter(schema)) if isinstance(schema, dict) else str(schema),
)
def test_schemas_outside_the_subset_get_no_fast_path(schema: dict[str, Any]) -> None:
    assert compile_predicate(schema, FORMATS) is None


def test_recursive_schema_checks_deep_instances() -> None:
    schema = {
        "$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
        "$ref": "#/$defs/n",
    }
    fast = compile_predicate(schema, FORMATS)
    assert fast is not None
    nested: Any = []
    for _ in range(50):
        nested = [nested, []]
    assert fast(nested)
    assert not fast([[[]], [1]])
    for left, right in itertools.product([[], [[]]], [[], [1]]):
        assert fast([left, right]) == Draft202012Validator(schema).is_valid([left, right])


def test_the_assertion_list_covers_every_draft_2020_12_keyword() -> None:
    # a keyword missing here would be ignored by the fast path instead of sent to jsonschema
    assert set(Draft202012Validator.VALIDATORS) <= ASSERTIONS


def _config_variants() -> list[Any]:
    demo = yaml.safe_load(Path("config/demo.yaml").read_text())
    variants = [demo]
    for path, value in [
        (("storage", "backend"), "mongo"),
        (("storage", "unknown_key"), 1),
        (("limits", "max_body_bytes"), -1),
        (("limits", "max_body_bytes"), "big"),
        (("listen",), "not a mapping"),
        (("keys",), [{"id": "k", "sha256": "0" * 64, "expires": "2999-01-01T00:00:00Z"}]),
        (("keys",), [{"id": "k", "sha256": "0" * 64, "expires": "next tuesday"}]),
        (("keys",), [{"id": "k", "sha256": "xyz"}]),
        (("customers",), {"acme": {"budget": {"usd": 5, "period": "month"}}}),
        (("customers",), {"bad id!": {"budget": {"usd": 5, "period": "month"}}}),
        (("customers",), {"acme": {"budget": {"usd": 5, "period": "fortnight"}}}),
    ]:
        doc = copy.deepcopy(demo)
        parent = doc
        for part in path[:-1]:
            parent = parent.setdefault(part, {})
        parent[path[-1]] = value
        variants.append(doc)
    return variants


def test_the_config_check_agrees_with_jsonschema() -> None:
    fast = _valid_config()
    assert fast is not None, "the config schema should compile: startup then skips jsonschema"
    verdicts = [(fast(doc), _validator().is_valid(doc)) for doc in _config_variants()]
    assert all(mine == reference for mine, reference in verdicts), verdicts
    assert [reference for _, reference in verdicts].count(True) >= 3  # valid ones are covered
