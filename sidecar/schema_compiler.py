"""A JSON Schema of our own compiled to a plain predicate: the config file's fast check.

`jsonschema` takes ≈0.1 s to import and walks a schema generically on every call. The config
schema (sidecar/settings/schema.json) uses a small set of keywords, so `compile_predicate` turns
it into nested closures once and a valid config (the usual case) is accepted without importing
`jsonschema`, which then only explains an invalid one. The predicate only ever says "valid"
when Draft 2020-12 would: a schema using any keyword outside the subset gets no predicate (None).

Only for trusted schemas: patterns are matched with `re`, without a bound on time. Client
schemas (`response_format`) go through jsonschema-rs, within the bounds of
`sidecar.schema_cost`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

Predicate = Callable[[Any], bool]

_OBJECT = frozenset(
    {"properties", "required", "additionalProperties", "minProperties", "maxProperties"}
)
_STRING = frozenset({"minLength", "maxLength", "pattern"})
_NUMBER = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
_ARRAY = frozenset({"items", "minItems", "maxItems"})
_GROUPED = _OBJECT | _STRING | _NUMBER | _ARRAY
_SCOPED = frozenset({"$id", "$anchor", "$dynamicAnchor", "$dynamicRef", "$recursiveRef"})
# What Draft 2020-12 asserts (jsonschema's Draft202012Validator.VALIDATORS, written out so
# that this module does not import jsonschema; a test checks the two agree); any other key is
# an annotation (or unknown) and ignored, as jsonschema ignores it.
ASSERTIONS = frozenset(
    {
        "$dynamicRef", "$ref", "additionalProperties", "allOf", "anyOf", "const", "contains",
        "dependentRequired", "dependentSchemas", "enum", "exclusiveMaximum", "exclusiveMinimum",
        "format", "if", "items", "maxContains", "maxItems", "maxLength", "maxProperties",
        "maximum", "minContains", "minItems", "minLength", "minProperties", "minimum",
        "multipleOf", "not", "oneOf", "pattern", "patternProperties", "prefixItems",
        "properties", "propertyNames", "required", "type", "unevaluatedItems",
        "unevaluatedProperties", "uniqueItems",
    }
)  # fmt: skip


class FormatChecker(Protocol):
    """What the compiler needs of a format checker (jsonschema's FormatChecker has it)."""

    checkers: dict[str, Any]

    def conforms(self, instance: object, format: str) -> bool: ...


class Unsupported(Exception):
    """The schema uses something the fast path does not reproduce exactly."""


class BadPattern(Exception):
    """A pattern does not compile."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


_TYPES: dict[str, Predicate] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "number": _is_number,
    "integer": _is_integer,
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _always(value: Any) -> bool:
    return True


def _never(value: Any) -> bool:
    return False


def _all(checks: Sequence[Predicate]) -> Predicate:
    if not checks:
        return _always
    if len(checks) == 1:
        return checks[0]
    frozen = tuple(checks)

    def check(value: Any) -> bool:
        for one in frozen:  # noqa: SIM110 (a loop beats all() over a generator here)
            if not one(value):
                return False
        return True

    return check


def trusted_matcher(pattern: str) -> Callable[[str], bool]:
    """`re`, without a time bound: for schemas of our own (the config's), not a client's."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise BadPattern(f"{pattern!r}: {exc}") from None
    return lambda text: compiled.search(text) is not None


def compile_predicate(
    schema: Any,
    format_checker: FormatChecker | None,
    matcher: Callable[[str], Callable[[str], bool]] = trusted_matcher,
) -> Predicate | None:
    """A predicate equal to Draft 2020-12 validity for `schema` (already checked), or None.
    `pattern`s match through `matcher` (by default `re`, unbounded: trusted schemas only)."""
    if _has_scoped_keyword(schema, is_root=True):
        return None
    try:
        return _Compiler(schema, format_checker, matcher).compile(schema)
    except (Unsupported, BadPattern, RecursionError):
        return None


def _has_scoped_keyword(node: Any, is_root: bool = False) -> bool:
    if isinstance(node, list):
        return any(_has_scoped_keyword(item) for item in node)
    if not isinstance(node, dict):
        return False
    for key, value in node.items():
        if key in _SCOPED and not (key == "$id" and is_root):
            return True
        if _has_scoped_keyword(value):
            return True
    return False


class _Compiler:
    def __init__(
        self,
        root: Any,
        format_checker: FormatChecker | None,
        matcher: Callable[[str], Callable[[str], bool]],
    ) -> None:
        self.root = root
        self.format_checker = format_checker
        self.matcher = matcher
        self.refs: dict[str, Predicate] = {}
        self.keywords: dict[str, Callable[[Any], Predicate]] = {
            "type": self._type,
            "enum": _membership,
            "const": lambda value: _membership([value]),
            "format": self._format,
            "anyOf": self._any_of,
            "allOf": self._all_of,
            "oneOf": self._one_of,
            "not": self._not,
            "propertyNames": self._property_names,
            "$ref": self._ref,
        }

    def compile(self, node: Any) -> Predicate:
        if node is True:
            return _always
        if node is False:
            return _never
        if not isinstance(node, dict):
            raise Unsupported("not a schema")
        checks: list[Predicate] = []
        for key, value in node.items():
            if key not in ASSERTIONS or key in _GROUPED:
                continue
            handler = self.keywords.get(key)
            if handler is None:
                raise Unsupported(key)
            checks.append(handler(value))
        if node.keys() & _OBJECT:
            checks.append(self._object(node))
        if node.keys() & _STRING:
            checks.append(self._string(node))
        if node.keys() & _NUMBER:
            checks.append(self._number(node))
        if node.keys() & _ARRAY:
            checks.append(self._array(node))
        return _all(checks)

    # -- keywords that apply to any instance ---------------------------------------------------
    def _type(self, value: Any) -> Predicate:
        names = [value] if isinstance(value, str) else list(value)
        tests = tuple(_TYPES[name] for name in names)
        if len(tests) == 1:
            return tests[0]
        return lambda v: any(test(v) for test in tests)

    def _format(self, name: str) -> Predicate:
        checker = self.format_checker
        if checker is None or name not in checker.checkers:
            return _always
        return lambda v: checker.conforms(v, name)

    def _any_of(self, subs: list[Any]) -> Predicate:
        checks = tuple(self.compile(sub) for sub in subs)
        return lambda v: any(check(v) for check in checks)

    def _all_of(self, subs: list[Any]) -> Predicate:
        return _all([self.compile(sub) for sub in subs])

    def _one_of(self, subs: list[Any]) -> Predicate:
        checks = tuple(self.compile(sub) for sub in subs)
        return lambda v: sum(1 for check in checks if check(v)) == 1

    def _not(self, sub: Any) -> Predicate:
        check = self.compile(sub)
        return lambda v: not check(v)

    def _property_names(self, sub: Any) -> Predicate:
        check = self.compile(sub)
        return lambda v: not isinstance(v, dict) or all(check(key) for key in v)

    def _ref(self, ref: str) -> Predicate:
        found = self.refs.get(ref)
        if found is not None:
            return found
        target: list[Predicate] = []
        self.refs[ref] = lambda v: target[0](v)  # late-bound: refs may be recursive
        target.append(self.compile(self._resolve(ref)))
        return self.refs[ref]

    def _resolve(self, ref: str) -> Any:
        if ref == "#":
            return self.root
        if not ref.startswith("#/") or "%" in ref:
            raise Unsupported(ref)
        node = self.root
        for raw in ref[2:].split("/"):
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise Unsupported(ref)
        return node

    # -- keywords that apply to one JSON type ----------------------------------------------------
    def _object(self, node: dict[str, Any]) -> Predicate:
        properties = {name: self.compile(sub) for name, sub in node.get("properties", {}).items()}
        required = tuple(node.get("required", ()))
        extra = node.get("additionalProperties")
        additional = None if extra is None or extra is True else self.compile(extra)
        low, high = node.get("minProperties"), node.get("maxProperties")

        def check(v: Any) -> bool:
            if not isinstance(v, dict):
                return True
            for name in required:
                if name not in v:
                    return False
            if (low is not None and len(v) < low) or (high is not None and len(v) > high):
                return False
            for key, item in v.items():
                sub = properties.get(key)
                if sub is not None:
                    if not sub(item):
                        return False
                elif additional is not None and not additional(item):
                    return False
            return True

        return check

    def _string(self, node: dict[str, Any]) -> Predicate:
        low, high = node.get("minLength"), node.get("maxLength")
        matches = self.matcher(node["pattern"]) if "pattern" in node else None

        def check(v: Any) -> bool:
            if not isinstance(v, str):
                return True
            if (low is not None and len(v) < low) or (high is not None and len(v) > high):
                return False
            return matches is None or matches(v)

        return check

    def _number(self, node: dict[str, Any]) -> Predicate:
        low, high = node.get("minimum"), node.get("maximum")
        above, below = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")

        def check(v: Any) -> bool:
            if not _is_number(v):
                return True
            return not (
                (low is not None and v < low)
                or (high is not None and v > high)
                or (above is not None and v <= above)
                or (below is not None and v >= below)
            )

        return check

    def _array(self, node: dict[str, Any]) -> Predicate:
        items = self.compile(node["items"]) if "items" in node else None
        low, high = node.get("minItems"), node.get("maxItems")

        def check(v: Any) -> bool:
            if not isinstance(v, list):
                return True
            if (low is not None and len(v) < low) or (high is not None and len(v) > high):
                return False
            return items is None or all(items(item) for item in v)

        return check


def _membership(values: list[Any]) -> Predicate:
    """enum/const for scalar values, with JSON equality (true is not 1, 1 is 1.0)."""
    if any(isinstance(v, dict | list) for v in values):
        raise Unsupported("enum/const with arrays or objects")
    strings = frozenset(v for v in values if isinstance(v, str))
    booleans = tuple(v for v in values if isinstance(v, bool))
    numbers = frozenset(v for v in values if _is_number(v))
    has_null = any(v is None for v in values)

    def check(v: Any) -> bool:
        if isinstance(v, str):
            return v in strings
        if isinstance(v, bool):
            return v in booleans
        if _is_number(v):
            return v in numbers
        return v is None and has_null

    return check
