"""`pattern` matching for client-sent JSON Schemas, bounded in time.

A schema's `pattern` comes from the client and is matched against the model's answer on the
event loop. Python's `re` backtracks without limit, so a pattern such as `^(a|aa)+$` against a
few dozen characters would stall every request of the process (ReDoS). The `regex` module
takes a timeout: a match that runs past MATCH_SECONDS raises, and the answer is treated as not
matching, with a message that says why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from typing import Any

MATCH_SECONDS = 0.05


class PatternTooSlow(Exception):
    """The pattern did not finish matching within MATCH_SECONDS."""


class BadPattern(Exception):
    """The pattern does not compile."""


@lru_cache(maxsize=1024)
def compiled(pattern: str) -> Any:
    """The compiled pattern; BadPattern for one that does not compile."""
    import regex  # not at startup: only client schemas with a pattern need it

    try:
        return regex.compile(pattern)
    except regex.error as exc:
        raise BadPattern(f"{pattern!r}: {exc}") from None


def search(pattern: str, text: str) -> bool:
    """Whether `pattern` matches somewhere in `text`; PatternTooSlow past the time limit."""
    if len(text) <= SHORT_TEXT and linear(pattern):
        return compiled(pattern).search(text) is not None  # the timer costs ≈ 3.5 µs a call
    try:
        return compiled(pattern).search(text, timeout=MATCH_SECONDS) is not None
    except TimeoutError:
        raise PatternTooSlow(pattern) from None


SHORT_TEXT = 1024  # characters


@lru_cache(maxsize=1024)
def linear(pattern: str) -> bool:
    """Whether `pattern` cannot backtrack much: no group, alternation, backreference or
    lookaround, and at most one quantifier of variable length (`^[A-Z]{3}-[0-9]+$`). Such a
    search is at worst quadratic in the text, which SHORT_TEXT bounds; every other pattern is
    matched under the timer."""
    variable = 0
    at, in_class = 0, False
    while at < len(pattern):
        char = pattern[at]
        if char == "\\":
            if at + 1 < len(pattern) and pattern[at + 1].isdigit() and not in_class:
                return False  # a backreference
            at += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            if pattern[at + 1 : at + 2] == "]":
                at += 1  # a literal ] first in the class
        elif char in "()|":
            return False
        elif char in "*+?":
            variable += 1
        elif char == "{":
            close = pattern.find("}", at)
            low, comma, high = pattern[at + 1 : close].partition(",")
            if close < 0 or not low.isdigit():
                return False  # not a count: keep to the timer
            if comma and high != low:
                variable += 1
            at = close
        at += 1
    return variable <= 1


def matcher(pattern: str) -> Callable[[str], bool]:
    """A predicate for the compiled fast path: a match that runs too long counts as none (the
    validator, asked next for the errors, then says why)."""
    compiled(pattern)

    def match(text: str) -> bool:
        try:
            return search(pattern, text)
        except PatternTooSlow:
            return False

    return match


def too_slow_message(pattern: str) -> str:
    return (
        f"matching the pattern {pattern!r} took over {MATCH_SECONDS * 1000:.0f} ms and was "
        "stopped (a pattern with nested repetition, such as (a|aa)+, can take exponential time)"
    )


# jsonschema keyword functions (validator, value, instance, schema) → errors, for the keywords
# that match patterns; installed on the Draft 2020-12 validator that checks client schemas.
def pattern_keyword(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    from jsonschema import ValidationError

    if not validator.is_type(instance, "string"):
        return
    try:
        if not search(pattern, instance):
            yield ValidationError(f"{instance!r} does not match {pattern!r}")
    except PatternTooSlow:
        yield ValidationError(too_slow_message(pattern))
    except BadPattern as exc:
        yield ValidationError(f"the pattern cannot be used: {exc}")


def pattern_properties_keyword(
    validator: Any, patterns: Mapping[str, Any], instance: Any, schema: Any
) -> Iterator[Any]:
    from jsonschema import ValidationError

    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for name, value in instance.items():
            try:
                matched = search(pattern, name)
            except PatternTooSlow:
                yield ValidationError(too_slow_message(pattern))
                return
            if matched:
                yield from validator.descend(value, subschema, path=name, schema_path=pattern)


def additional_properties_keyword(
    validator: Any, additional: Any, instance: Any, schema: Any
) -> Iterator[Any]:
    from jsonschema import ValidationError

    if not validator.is_type(instance, "object"):
        return
    declared = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = []
    for name in instance:
        if name in declared:
            continue
        try:
            if any(search(pattern, name) for pattern in patterns):
                continue
        except PatternTooSlow as slow:
            yield ValidationError(too_slow_message(str(slow)))
            return
        extras.append(name)
    if validator.is_type(additional, "object"):
        for name in extras:
            yield from validator.descend(instance[name], additional, path=name)
    elif additional is False and extras:
        names = ", ".join(repr(name) for name in sorted(extras, key=str))
        if patterns:
            verb = "does" if len(extras) == 1 else "do"
            listed = ", ".join(repr(pattern) for pattern in sorted(patterns))
            yield ValidationError(f"{names} {verb} not match any of the regexes: {listed}")
        else:
            verb = "was" if len(extras) == 1 else "were"
            yield ValidationError(
                f"Additional properties are not allowed ({names} {verb} unexpected)"
            )


SAFE_KEYWORDS = {
    "pattern": pattern_keyword,
    "patternProperties": pattern_properties_keyword,
    "additionalProperties": additional_properties_keyword,
}


def unbounded_keyword(schema: Any) -> str | None:
    """A keyword combination whose matching jsonschema does with `re` internally (and so
    without a time bound): `unevaluatedProperties` in a schema that has `patternProperties`."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            found.update(
                key for key in ("patternProperties", "unevaluatedProperties") if key in node
            )
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)
    if {"patternProperties", "unevaluatedProperties"} <= found:
        return "unevaluatedProperties together with patternProperties"
    return None
