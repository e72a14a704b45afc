"""Client schemas are hostile input (SPEC 2.3): their cost is bounded, per request.

Compiling a `response_format` and checking every answer of a request together hold the event
loop 50 ms at most: hard bounds refuse a schema that could not keep to it (400), a check whose
bound does not fit what the request has left is not started (the answer is a schema failure
saying the schema is too costly), and the bounds hold on adversarial inputs (measured here).
"""

from __future__ import annotations

import json
import random
import time
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from sidecar.errors import GatewayError, Outcome, UpstreamError
from sidecar.structured import SchemaCache, SchemaPlan, enforce

pytestmark = pytest.mark.timeout(60)  # the code before this change took minutes on some of these
BUDGET_NS = 50_000_000  # SPEC 2.3: compiling and checking, per request


def response_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def plan_for(schema: Any) -> SchemaPlan:
    plan = SchemaCache().plan(response_format(schema))
    assert plan is not None
    return plan


def refusal(schema: Any) -> GatewayError:
    with pytest.raises(GatewayError) as refused:
        SchemaCache().plan(response_format(schema))
    assert refused.value.status == 400
    assert refused.value.param == "response_format"
    return refused.value


def objects(count: int) -> list[dict[str, Any]]:
    return [{"id": i, "name": f"item {i}", "tags": ["a", "b"]} for i in range(count)]


# -- the four hostile inputs of issue 16 -------------------------------------------------------


def test_unique_items_over_20k_objects_is_refused_as_too_costly_at_once() -> None:
    plan = plan_for({"type": "array", "uniqueItems": True})
    answer = orjson.dumps(objects(20_000)).decode()
    started = time.monotonic()
    verdicts = [plan.check(answer) for _ in range(3)]  # the first answer and two re-prompts
    assert time.monotonic() - started < 0.5
    for verdict in verdicts:
        assert not verdict.ok
        assert "the schema is too costly to check this answer" in verdict.problems[0].message
    assert plan.spent_ns < BUDGET_NS


@pytest.mark.parametrize("duplicate", [False, True], ids=["unique", "duplicate"])
def test_unique_items_over_1000_objects_is_checked_within_the_budget(duplicate: bool) -> None:
    plan = plan_for({"type": "array", "uniqueItems": True})
    items = objects(1000) + (objects(1) if duplicate else [])
    started = time.monotonic()
    verdict = plan.check(orjson.dumps(items).decode())
    assert time.monotonic() - started < 0.2
    assert verdict.ok is not duplicate
    if duplicate:
        assert "has non-unique elements" in verdict.problems[0].message
    assert plan.spent_ns < BUDGET_NS


def test_two_thousand_patterns_are_refused_naming_the_bound() -> None:
    properties = {f"p{i}": {"type": "string", "pattern": f"^x{i}-[a-z]+$"} for i in range(2000)}
    started = time.monotonic()
    error = refusal({"type": "object", "properties": properties})
    assert time.monotonic() - started < 0.2
    assert "has over 32 patterns; at most 32" in error.message


def test_a_backtracking_pattern_over_100_strings_is_checked_in_linear_time() -> None:
    plan = plan_for({"type": "array", "items": {"type": "string", "pattern": "^(a|aa)+$"}})
    answer = json.dumps(["a" * 60 + "!"] * 100)
    started = time.monotonic()
    verdicts = [plan.check(answer) for _ in range(3)]  # the first answer and two re-prompts
    assert time.monotonic() - started < 0.1
    for verdict in verdicts:
        assert len(verdict.problems) == 5  # the first five of a hundred, in order
        assert verdict.problems[0].pointer == "/0"
        assert 'does not match "^(a|aa)+$"' in verdict.problems[0].message
    assert plan.spent_ns < BUDGET_NS


def test_a_15k_property_schema_is_refused_before_it_is_compiled() -> None:
    properties = {f"field_{i}": {"type": "string"} for i in range(15_000)}
    started = time.monotonic()
    error = refusal({"type": "object", "properties": properties})
    assert time.monotonic() - started < 0.2
    assert "the gateway takes schemas of at most 128 KiB" in error.message


# -- the other bounds ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        (
            {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1200)}},
            "has over 1000 subschemas; at most 1000",
        ),
        ({"pattern": "^" + "a" * 600 + "$"}, "has a pattern of 602 characters; at most 512"),
        (
            json.loads('{"items":' * 40 + "{}" + "}" * 40),
            "nests subschemas over 32 deep; at most 32",
        ),
        ({"$ref": "https://schemas.example/remote.json"}, "only references inside the schema"),
        ({"$ref": "other.json#/$defs/a"}, "only references inside the schema"),
        ({"$ref": "#/$defs/missing"}, "has a $ref that cannot be resolved"),
        ({"$ref": "#nowhere"}, "no such $anchor"),
        ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "$ref cycle"),
        ({"$defs": {"a": {"$id": "a.json"}}, "$ref": "#/$defs/a"}, "has an $id below its root"),
        ({"$dynamicRef": "#meta"}, "uses $dynamicRef"),
        ({"pattern": "^(?=.*[0-9]).+$"}, "lookaround, backreferences"),
        ({"pattern": r"(\w)\1"}, "lookaround, backreferences"),
        ({"pattern": "^(\\p{L}{1,50} ){1,20}$"}, "use + and maxLength"),
        ({"items": {"enum": [{"a": i, "b": "x"} for i in range(500)]}}, "is too costly"),
    ],
    ids=[
        "subschemas", "pattern-length", "nesting", "remote-ref", "relative-ref", "dangling-ref",
        "anchor", "ref-cycle", "nested-id", "dynamic-ref", "lookahead", "backreference",
        "huge-pattern", "enum-of-objects",
    ],
)  # fmt: skip
def test_a_schema_over_a_bound_is_400_saying_which(schema: Any, says: str) -> None:
    assert says in refusal(schema).message


def test_subschemas_that_multiply_with_every_reference_are_refused() -> None:
    # 2^30 paths through allOf: the validator would apply d30 to one string 2^30 times
    defs: dict[str, Any] = {
        f"d{i}": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(30)
    }
    defs["d30"] = {"type": "string"}
    started = time.monotonic()
    error = refusal({"$defs": defs, "$ref": "#/$defs/d0"})
    assert time.monotonic() - started < 0.2
    assert "is too costly" in error.message


RECURSIVE_UNION = {
    "$defs": {
        "node": {
            "anyOf": [
                {"type": "array", "items": {"$ref": "#/$defs/node"}},
                {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 100},
            ]
        }
    },
    "$ref": "#/$defs/node",
}


def test_a_recursion_that_doubles_with_depth_checks_shallow_answers_and_refuses_deep_ones() -> None:
    plan = plan_for(RECURSIVE_UNION)
    shallow = plan.check('[["x"]]')
    assert [str(p) for p in shallow.problems] == [
        "(root): [[\"x\"]] is not valid under any of the schemas listed in the 'anyOf' keyword"
    ]
    deep: Any = "x"
    for _ in range(40):
        deep = [deep]
    started = time.monotonic()
    verdict = plan.check(json.dumps(deep))
    assert time.monotonic() - started < 0.1
    assert "nested too deep for this schema's recursion" in verdict.problems[0].message


@pytest.mark.parametrize(
    "schema",
    [
        {  # a JSON value of any shape: a recursion that never grows
            "$defs": {
                "v": {
                    "anyOf": [
                        {"type": ["string", "number", "boolean", "null"]},
                        {"type": "array", "items": {"$ref": "#/$defs/v"}},
                        {"type": "object", "additionalProperties": {"$ref": "#/$defs/v"}},
                    ]
                }
            },
            "$ref": "#/$defs/v",
        },
        {  # pydantic's recursive model: parent: Order | None
            "$defs": {
                "Order": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "parent": {"anyOf": [{"$ref": "#/$defs/Order"}, {"type": "null"}]},
                    },
                    "required": ["id", "parent"],
                }
            },
            "$ref": "#/$defs/Order",
        },
    ],
    ids=["json-value", "pydantic-recursive"],
)
def test_recursive_schemas_check_deep_answers(schema: Any) -> None:
    plan = plan_for(schema)
    deep: Any = None
    for level in range(60):
        deep = {"id": str(level), "parent": deep}
    assert plan.check(json.dumps(deep)).ok


# -- the budget of one request -----------------------------------------------------------------


def test_compiling_is_charged_to_the_request_that_compiled() -> None:
    cache = SchemaCache()
    first = cache.plan(response_format({"type": "object"}))
    again = cache.plan(response_format({"type": "object"}))
    assert first is not None and again is not None
    assert first.spent_ns > 0
    assert again.spent_ns == 0
    assert first.compiled is again.compiled


def test_checks_add_up_and_one_that_cannot_fit_is_not_started() -> None:
    plan = plan_for({"type": "array", "items": {"type": "string", "pattern": "[ab]*a[ab]{30}c"}})
    answer = json.dumps(["ab" * 3000])  # a pattern that can be slow: a bound of about 15 ms
    first = plan.check(answer)
    assert not first.ok and "too costly" not in first.problems[0].message
    spent = plan.spent_ns
    assert 0 < spent < BUDGET_NS
    assert plan.check(answer).problems == first.problems
    assert plan.spent_ns > spent
    plan.spent_ns = BUDGET_NS - 10_000_000  # 10 ms left
    started = time.monotonic()
    refused = plan.check(answer)
    assert time.monotonic() - started < 0.005
    assert "the schema is too costly to check this answer" in refused.problems[0].message
    assert plan.check("[]").ok  # a small one still fits
    assert plan.spent_ns < BUDGET_NS


class Calls:
    """A candidate's call that answers `content` every time, counting the calls."""

    def __init__(self, content: str) -> None:
        self.content = content
        self.count = 0

    async def __call__(self, flow: Any, candidate: Any, body: dict[str, Any]) -> Any:
        self.count += 1
        choice = {"message": {"role": "assistant", "content": self.content}}
        return SimpleNamespace(body={"choices": [choice]}, usage=None)


CANDIDATE: Any = SimpleNamespace(label="m")


def fake_flow() -> Any:
    return SimpleNamespace(
        body={"messages": [{"role": "user", "content": "hi"}]},
        schema_enforced=False,
        reprompts=0,
        schema_reprompts=[],
        schema_checks=[],
    )


async def test_enforce_stops_calling_once_the_budget_is_spent() -> None:
    plan = plan_for({"type": "object", "required": ["a"]})
    plan.spent_ns = BUDGET_NS  # e.g. by an earlier candidate of the cascade
    calls = Calls('{"a": 1}')
    with pytest.raises(UpstreamError) as failed:
        await enforce(calls, fake_flow(), CANDIDATE, plan, True, False)
    assert failed.value.outcome is Outcome.SCHEMA_FAILURE
    assert "the schema is too costly" in failed.value.message
    assert calls.count == 0


async def test_enforce_reprompts_an_answer_too_costly_to_check_then_fails() -> None:
    plan = plan_for({"type": "array", "uniqueItems": True})
    calls = Calls(orjson.dumps(objects(20_000)).decode())
    started = time.monotonic()
    with pytest.raises(UpstreamError) as failed:
        await enforce(calls, fake_flow(), CANDIDATE, plan, True, False)
    assert time.monotonic() - started < 1
    assert failed.value.outcome is Outcome.SCHEMA_FAILURE
    assert "the schema is too costly to check this answer" in failed.value.message
    assert calls.count == 3


# -- the bounds hold: measured time under the bound, on adversarial inputs -------------------------


def _floats(count: int) -> list[float]:
    return [i + 0.5 for i in range(count)]


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


ADVERSARIAL: dict[str, tuple[Any, Any]] = {
    "float-bounds": (
        {"type": "array", "items": {"type": "number", "minimum": 0, "exclusiveMaximum": 1e9}},
        _floats(5000),
    ),
    "fraction-multipleOf": (
        {"type": "array", "items": {"type": "number", "multipleOf": 0.01}},
        _floats(2000),
    ),
    "enum-of-floats": ({"type": "array", "items": {"enum": _floats(5)}}, [4.5] * 2000),
    "slow-pattern": (
        {"type": "array", "items": {"type": "string", "pattern": "(a|b)*a(a|b){20}c"}},
        ["ab" * 5000],
    ),
    "idn-hostname": (
        {"type": "array", "items": {"type": "string", "format": "idn-hostname"}},
        [f"exämple-{i}.com" for i in range(2000)],
    ),
    "unique-floats": ({"type": "array", "uniqueItems": True}, _floats(10_000)),
    "type-errors": ({"type": "array", "items": {"type": "string"}}, list(range(500))),
    "enum-errors": ({"type": "array", "items": {"enum": [str(i) for i in range(300)]}}, [1] * 50),
    "required-errors": (
        {"type": "array", "items": {"required": [f"k{i}" for i in range(40)]}},
        [{}] * 20,
    ),
    "nested-errors": (
        {
            "$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}, "minItems": 2}},
            "$ref": "#/$defs/n",
        },
        _nested(120),
    ),
    "doubling-recursion": (RECURSIVE_UNION, _nested(6)),
}


def _fastest(check: Any, times: int = 3) -> int:
    best = None
    for _ in range(times):
        started = time.perf_counter_ns()
        check()
        took = time.perf_counter_ns() - started
        best = took if best is None else min(best, took)
    assert best is not None
    return best


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_a_check_takes_no_longer_than_its_bound(name: str) -> None:
    schema, value = ADVERSARIAL[name]
    compiled = plan_for(schema).compiled
    assert compiled.cost is not None
    content = orjson.dumps(value).decode()
    size = len(content.encode())
    parsed = orjson.loads(content)
    cost = compiled.cost
    shape = cost.shape(parsed)
    bound = cost.walked_ns(size, shape) if cost.below is None else cost.check_ns(size)
    took = _fastest(lambda: compiled.validator.is_valid(orjson.loads(content)))
    assert took <= bound, f"{took / 1e6:.1f} ms, bound {bound / 1e6:.1f} ms"
    if not compiled.validator.is_valid(parsed):
        bound = cost.errors_ns(size, shape)
        took = _fastest(lambda: list(compiled.validator.iter_errors(parsed)))
        assert took <= bound, f"listing errors: {took / 1e6:.1f} ms, bound {bound / 1e6:.1f} ms"


# -- any JSON at all: a bound or a 400, never a crash ---------------------------------------------

_KEYWORDS = [
    "type", "enum", "const", "properties", "patternProperties", "additionalProperties",
    "items", "prefixItems", "contains", "allOf", "anyOf", "oneOf", "not", "if", "then", "else",
    "required", "dependentRequired", "dependentSchemas", "propertyNames", "pattern", "format",
    "multipleOf", "minimum", "uniqueItems", "unevaluatedProperties", "unevaluatedItems", "$ref",
    "$defs", "$anchor", "$id", "minLength",
]  # fmt: skip


def _random_json(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, 1, -3, 2.5, 0.01, 1e300, 10**18])
    if kind in (2, 3, 4, 5):
        return rng.choice(["string", "#", "#/$defs/a", "#a", "^(a|b)*$", "(", "email", "x"])
    if kind == 6:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return _random_schema(rng, depth + 1)


def _random_schema(rng: random.Random, depth: int = 0) -> Any:
    schema: dict[str, Any] = {}
    for name in rng.sample(_KEYWORDS, rng.randrange(5)):
        if name in ("properties", "patternProperties", "$defs", "dependentSchemas"):
            keys = rng.sample(["a", "b", "^x", "(", "c"], rng.randrange(3))
            schema[name] = {key: _random_json(rng, depth + 1) for key in keys}
        else:
            schema[name] = _random_json(rng, depth + 1)
    return schema


def test_any_json_gets_a_bound_or_a_400() -> None:
    rng = random.Random(16)
    for _ in range(2000):
        schema = _random_schema(rng)
        try:
            SchemaCache().plan(response_format(schema))
        except GatewayError as refused:
            assert refused.status == 400, schema
