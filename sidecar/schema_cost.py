"""What checking an answer against a client's JSON Schema can cost, bounded before it starts.

The validator (jsonschema-rs) holds the GIL while it runs (measured: a thread does not free the
event loop) and a running check cannot be stopped. So SPEC 2.3's 50 ms per request is kept by
knowing what a check can cost before it starts: `sidecar.schema_graph` bounds the work of one
value of an answer, per depth, from the costs of each subschema (`own_work`) set here, and a
`Cost` turns that into nanoseconds for a given answer: `check_ns` for parsing and checking it,
`errors_ns` for listing its errors (jsonschema-rs remembers nothing when it does: a value that
two recursive branches both reach at depth d is visited 2^d times).

The hard bounds on a schema live here too, with the constants: measured against jsonschema-rs
0.61 per keyword, on values of each type, valid and not, then given a margin of about two
(tests/test_schema_budget.py keeps measured times under them on adversarial inputs).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

BUDGET_NS = 50_000_000  # SPEC 2.3: what compiling and checking may hold the loop, per request

# Hard bounds on a client's schema (a 400 names the one exceeded).
MAX_SCHEMA_BYTES = 128 * 1024  # the response_format, serialized
MAX_SUBSCHEMAS = 1000
MAX_NESTING = 32  # schema objects inside schema objects
MAX_PATTERNS = 32  # `pattern` values and `patternProperties` keys
MAX_PATTERN_CHARS = 512
REGEX_SIZE_LIMIT = 64 * 1024  # bytes of one compiled pattern (the regex crate's size_limit)
MIN_ANSWER_BYTES = 4096  # a schema must be able to check an answer this large, this shallow:
MIN_ANSWER_DEPTH = 3

# What one check costs, in nanoseconds: measured on jsonschema-rs 0.61 (per keyword, on values
# of each type, valid and not), then given a margin of about two.
NS_FIXED = 30_000  # per check: the calls, the verdict
NS_PARSE = 6  # per answer byte: orjson, the fence search, counting values
NS_WALK = 400  # per answer value, when its depths or sizes are needed (a Python walk)
NS_APPLY = 150  # per subschema applied to a value
NS_KEYWORD = 100  # per keyword of that subschema
NS_NUMBER = 4_000  # the first numeric bound (a float compared: ~1 µs)
NS_NUMBER_MORE = 500  # each other one
NS_FRACTION = 12_000  # multipleOf a fraction (~3 µs)
NS_EQUAL_NUMBER = 3_000  # a number in an enum or const, compared for equality (~1.5 µs)
NS_ATOM = 250  # any other value of a const or of an enum entry that is an object or array
NS_UNIQUE = 600  # uniqueItems: per value under the array, hashed or compared
NS_FORMAT_VALUE = 6_000  # per string a format applies to (idn-hostname: ~1-2 µs)
NS_FORMAT = 150  # and per byte of it
NS_PATTERN_FAST = 120  # per byte: a pattern whose automaton stays small (see _pattern_ns)
NS_PATTERN_SLOW = 2_000  # per byte: one that can fall back to simulating its whole automaton
NS_UNEVALUATED = 200  # per member or item, per subschema consulted on whether it evaluated it
NS_ERROR = 25_000  # per error reported: its Python object, message, paths
NS_ERROR_ATOM = 600  # per enum/const entry a message prints
NS_ERROR_VALUE = 1_000  # per value inside the instance an error carries (converted, printed)

Work = tuple[float, float, float]  # ns per value, ns per byte of the value, errors per value
ZERO: Work = (0.0, 0.0, 0.0)

IN_PLACE = frozenset({"not", "if", "then", "else", "allOf", "anyOf", "oneOf", "dependentSchemas"})
MEMBERS = frozenset(
    {"properties", "patternProperties", "additionalProperties", "unevaluatedProperties",
     "propertyNames", "items", "prefixItems", "contains", "unevaluatedItems"}
)  # fmt: skip
_NUMBER = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
_STRING = frozenset({"minLength", "maxLength", "pattern", "format"})
_WEIGHED = frozenset(
    {"enum", "const", "required", "dependentRequired", "patternProperties"}
) | _NUMBER | _STRING  # fmt: skip
_ASSERTIONS = frozenset(
    {
        "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
        "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems", "minItems",
        "uniqueItems", "maxContains", "minContains", "maxProperties", "minProperties",
        "required", "dependentRequired", "format", "$ref",
    }
) | IN_PLACE | MEMBERS  # fmt: skip
_FORMAT_SLOW = frozenset({"regex"})  # the string is compiled as a pattern


class Refused(Exception):
    """The schema is over a bound, or uses what the bound cannot follow; the message says which."""


@dataclass(frozen=True, slots=True)
class Cost:
    """Upper bounds on the work of one value of an answer, by its depth in the answer.

    `by_depth[d]` holds for a value at depth d (the answer itself is at 0); when `bounded`, the
    last entry holds for every deeper value too, otherwise deeper values are too costly.
    `below` is then the bound of every value under the top, and `fixed_ns + byte_ns × n` a
    bound of checking any n-byte answer (precomputed: the check of a typical answer starts by
    asking whether this fits what its request has left).
    """

    by_depth: tuple[Work, ...]
    bounded: bool
    below: Work | None
    fixed_ns: float
    byte_ns: float

    @classmethod
    def of(cls, by_depth: tuple[Work, ...], bounded: bool) -> Cost:
        below = largest(by_depth[1:] or by_depth) if bounded else None
        if below is None:  # the bound depends on the depths: the answer must be walked first
            return cls(by_depth, bounded, None, float(NS_FIXED), NS_PARSE + NS_WALK / 2)
        per_byte = NS_PARSE + max(by_depth[0][1], below[1]) + below[0] / 2
        return cls(by_depth, bounded, below, NS_FIXED + by_depth[0][0], per_byte)

    def check_ns(
        self, answer_bytes: int, values: int | None = None, below: Work | None = None
    ) -> float:
        """Parsing an answer of `answer_bytes` bytes and checking it (is it valid?), every value
        under the top bounded by `below` (by default the bound for any depth). `values` bounds
        how many values it has; by default half its bytes (see `values`)."""
        bound = below or self.below
        if values is None:
            if bound is self.below:
                return self.fixed_ns + self.byte_ns * answer_bytes
            values = answer_bytes // 2  # a value and what ends it take 2 bytes or more
        if bound is None:
            return NS_FIXED + NS_PARSE * answer_bytes + NS_WALK * values
        top = self.by_depth[0]
        per_byte = NS_PARSE + max(top[1], bound[1])
        return NS_FIXED + top[0] + bound[0] * values + per_byte * answer_bytes

    def walked_ns(self, answer_bytes: int, shape: Shape) -> float:
        """Checking a parsed answer whose `shape` is known (`float('inf')` if it is too deep)."""
        if shape.too_deep:
            return float("inf")
        return NS_FIXED + NS_PARSE * answer_bytes + shape.value_ns + shape.byte_ns * answer_bytes

    def errors_ns(self, answer_bytes: int, shape: Shape) -> float:
        """Listing the errors of a parsed answer: a walk that remembers nothing (measured at up to
        twice a check's), and the errors it makes, each carrying its value (converted, printed)."""
        made = NS_ERROR * shape.errors + NS_ERROR_VALUE * shape.carried
        return 2 * self.walked_ns(answer_bytes, shape) + made

    def shape(self, value: Any) -> Shape:
        """Walk a parsed answer: its size, and the bound of each value at its depth."""
        table = self.by_depth
        last = len(table) - 1
        above: list[float] = []  # errors a value at each depth and its ancestors can report
        for work in table:
            above.append((above[-1] if above else 0.0) + work[2])
        values = 0
        value_ns = errors = carried = 0.0
        deepest = 0
        stack: list[tuple[Any, int]] = [(value, 0)]
        while stack:
            node, depth = stack.pop()
            values += 1
            if depth > deepest:
                deepest = depth
                if depth > last and not self.bounded:
                    return Shape(values, 0.0, 0.0, 0.0, 0.0, too_deep=True)
            work = table[min(depth, last)]
            value_ns += work[0]
            errors += work[2]
            # an error carries its value: this one is inside the values of every error above it
            carried += above[depth] if depth <= last else above[last] + (depth - last) * work[2]
            if isinstance(node, dict):
                stack.extend((child, depth + 1) for child in node.values())
            elif isinstance(node, list):
                stack.extend((child, depth + 1) for child in node)
        byte_ns = largest(table[: deepest + 1])[1]
        return Shape(values, value_ns + NS_WALK * values, byte_ns, errors, carried, too_deep=False)


def values(text: str) -> int:
    """An upper bound on the values in a JSON text (or a text around one): every value but the
    first follows a `[`, a `,` or a `:` (names are charged with their members)."""
    return 1 + text.count("[") + text.count(",") + text.count(":")


@dataclass(frozen=True, slots=True)
class Shape:
    """A parsed answer's size, and its work under a `Cost`."""

    values: int
    value_ns: float  # every value's per-value bound at its depth, summed (and the walk)
    byte_ns: float  # the per-byte bound of the deepest levels the answer reaches
    errors: float  # the errors its values can report, summed
    carried: float  # the values those errors carry (each error its value's subtree), summed
    too_deep: bool


def own_work(schema: dict[str, Any], keys: Any) -> Work:
    """What applying this subschema to one value costs, not counting its subschemas: its
    keywords, the numeric ones or the string ones (a value is one or the other), enums; and the
    errors it can report (one per keyword; one per name `required` misses)."""
    keywords = len(keys & _ASSERTIONS)
    value_ns = float(NS_APPLY + NS_KEYWORD * keywords)
    errors = float(keywords)
    weighed = keys & _WEIGHED
    if not weighed:
        return value_ns, 0.0, errors
    numeric = string = byte_ns = 0.0
    if "enum" in weighed or "const" in weighed:
        # entries that are strings, booleans or null are hashed; the others are compared one by
        # one, as a const is (numbers slowly); a message prints every entry
        options = as_list(schema.get("enum"), scalar=False)
        compared = [v for v in options if isinstance(v, int | float | dict | list)]
        if "const" in weighed:
            compared.append(schema["const"])
        value_ns += sum(_equality_ns(v) for v in compared)
        printed = len(options) + sum(size(v) for v in compared)
        errors += printed * NS_ERROR_ATOM / NS_ERROR
    bounds = len(weighed & _NUMBER)
    if bounds:
        numeric = float(NS_NUMBER + NS_NUMBER_MORE * (bounds - 1))
        divisor = schema.get("multipleOf")
        if isinstance(divisor, int | float) and not float(divisor).is_integer():
            numeric += NS_FRACTION
    if "pattern" in weighed and isinstance(schema["pattern"], str):
        byte_ns += _pattern_ns(schema["pattern"])
    if "format" in weighed and isinstance(schema["format"], str):
        string = float(NS_FORMAT_VALUE)
        byte_ns += NS_PATTERN_SLOW if schema["format"] in _FORMAT_SLOW else NS_FORMAT
    if "patternProperties" in weighed:
        named = sum(_pattern_ns(p) for p in as_dict(schema["patternProperties"]))
        byte_ns += named * (2 if "additionalProperties" in keys else 1)  # names matched twice
    if "required" in weighed:
        errors += len(as_list(schema["required"], scalar=False))
    if "dependentRequired" in weighed:
        errors += sum(len(as_list(v)) for v in as_dict(schema["dependentRequired"]).values())
    return value_ns + max(numeric, string), byte_ns, errors


def _equality_ns(value: Any) -> float:
    """What comparing a value of an answer with `value` (an enum entry, a const) can cost."""
    total = 0.0
    stack = [value]
    while stack:
        node = stack.pop()
        is_number = isinstance(node, int | float) and not isinstance(node, bool)
        total += NS_EQUAL_NUMBER if is_number else NS_ATOM
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return total


def size(value: Any) -> int:
    """JSON values in `value` (an enum entry or a const compared against an answer's value)."""
    count = 0
    stack = [value]
    while stack:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any, scalar: bool = True) -> list[Any]:
    """`value` if it is a list; else a string (a single type name) alone, or nothing."""
    if isinstance(value, list):
        return value
    return [value] if scalar and isinstance(value, str) else []


def add(a: Work, b: Work) -> Work:
    """Work done one after the other."""
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def larger(a: Work, b: Work) -> Work:
    """The larger of two bounds, componentwise."""
    return (max(a[0], b[0]), max(a[1], b[1]), max(a[2], b[2]))


def total(parts: Any) -> Work:
    result = ZERO
    for part in parts:
        result = add(result, part)
    return result


def largest(parts: Any) -> Work:
    worst = ZERO
    for part in parts:
        worst = larger(worst, part)
    return worst


def _pattern_ns(pattern: str) -> float:
    """Per byte matched, what `pattern` can cost. The regex crate matches in linear time, but a
    pattern whose automaton is large (a counter after an ambiguous repetition: `(a|b)*a(a|b){20}`)
    overflows its lazy DFA's cache, and simulating the automaton costs up to ~1 µs a byte. One
    that is anchored and repeats nothing unboundedly, or that has few positions, cannot."""
    try:
        parsed = importlib.import_module("re._parser").parse(pattern)
        positions, unbounded = _positions(parsed)
    except Exception:  # Python's parser does not know some ECMA 262 syntax: assume the worst
        return NS_PATTERN_SLOW
    anchored = bool(parsed) and str(parsed[0][1]) == "AT_BEGINNING"
    if (anchored and not unbounded) or positions <= 16:
        return NS_PATTERN_FAST
    return NS_PATTERN_SLOW


def _positions(items: Any) -> tuple[int, bool]:
    """(characters the pattern matches one at a time, repetitions counted out; whether it
    repeats anything without an upper bound)."""
    total, unbounded = 0, False
    for op, argument in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, sub = argument
            inner, inner_unbounded = _positions(sub)
            endless = high > 65535
            unbounded = unbounded or endless or inner_unbounded
            total += inner * (low + 1 if endless else max(high, 1))
            continue
        if name == "SUBPATTERN":
            parts = [argument[-1]]
        elif name == "BRANCH":
            parts = argument[1]
        elif name in ("ASSERT", "ASSERT_NOT"):
            parts = [argument[1]]
        else:
            total += name != "AT"
            continue
        for part in parts:
            inner, inner_unbounded = _positions(part)
            total, unbounded = total + inner, unbounded or inner_unbounded
    return total, unbounded
