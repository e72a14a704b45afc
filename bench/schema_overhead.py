"""What JSON-schema enforcement costs per response, warm cache: `python -m bench.schema_overhead`.

Measures, in one process and one run, the steps `sidecar.structured` adds to a response:
  lookup      SchemaCache.plan() for a response_format already compiled (canonical hash + LRU)
  check       SchemaPlan.check() of a typical valid answer (parse + Draft 2020-12 validation,
              within the request's budget: the plan's spending is reset before each call)
  fenced      the same answer wrapped in a Markdown code fence (the slow parse path)
  invalid     an answer with three errors (what a re-prompt's error list costs to build)
  compile     a cold compile of the schema (what the cache saves), for scale
and reports each as ns/op and as a ratio to baselines measured in the same run: orjson.loads of
the whole upstream response body (which the sidecar does anyway for every response) and of the
answer's content alone. Numbers are only comparable within one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson

from sidecar.structured import SchemaCache

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "invoice_id": {"type": "string", "pattern": "^INV-[0-9]{6}$"},
        "issued": {"type": "string", "format": "date"},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "email": {"type": "string", "format": "email"},
                "country": {"type": "string", "enum": ["FR", "DE", "US", "GB", "JP"]},
            },
            "required": ["name", "email", "country"],
            "additionalProperties": False,
        },
        "lines": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1},
                    "unit_price": {"type": "number", "exclusiveMinimum": 0},
                },
                "required": ["sku", "quantity", "unit_price"],
                "additionalProperties": False,
            },
        },
        "paid": {"type": "boolean"},
        "notes": {"type": ["string", "null"]},
    },
    "required": ["invoice_id", "issued", "customer", "lines", "paid", "notes"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "invoice", "schema": SCHEMA, "strict": True},
}
ANSWER = orjson.dumps(
    {
        "invoice_id": "INV-004217",
        "issued": "2026-03-14",
        "customer": {"name": "Ada Lovelace", "email": "ada@example.com", "country": "GB"},
        "lines": [
            {"sku": "WIDGET-1", "quantity": 3, "unit_price": 9.5},
            {"sku": "GADGET-7", "quantity": 1, "unit_price": 129.0},
            {"sku": "BOLT-M4", "quantity": 200, "unit_price": 0.04},
        ],
        "paid": False,
        "notes": None,
    }
).decode()
INVALID = ANSWER.replace('"INV-004217"', '"4217"').replace('"GB"', '"UK"').replace("3,", "0,")
FENCED = f"Here is the invoice:\n```json\n{ANSWER}\n```"
BODY = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1767225600,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": ANSWER, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 412, "completion_tokens": 96, "total_tokens": 508},
        "system_fingerprint": "fp_bench",
    }
)


def per_op_ns(fn: Callable[[], object], seconds: float, rounds: int) -> float:
    """Median over `rounds` of the mean time of one call, each round ~`seconds` long."""
    calls = 1
    while True:  # calibrate: enough calls for one round to last about `seconds`
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        took = time.perf_counter() - start
        if took >= seconds / 10:
            break
        calls *= 4
    calls = max(1, int(calls * seconds / max(took, 1e-9)))
    samples = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter_ns() - start) / calls)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.3, help="length of one round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per step; medians shown")
    args = parser.parse_args(argv)

    cache = SchemaCache()
    plan = cache.plan(RESPONSE_FORMAT)
    assert plan is not None
    assert plan.check(ANSWER).ok and plan.check(FENCED).ok
    assert len(plan.check(INVALID).problems) == 3

    def checked(content: str) -> Callable[[], object]:
        def check() -> object:
            plan.spent_ns = 0  # each call as a request's first check
            return plan.check(content)

        return check

    def per_response() -> object:
        fresh = cache.plan(RESPONSE_FORMAT)
        assert fresh is not None
        return fresh.check(ANSWER)

    def cold_compile() -> object:
        return SchemaCache().plan(RESPONSE_FORMAT)

    steps: list[tuple[str, Callable[[], object]]] = [
        ("baseline: orjson.loads(response body)", lambda: orjson.loads(BODY)),
        ("baseline: orjson.loads(content)", lambda: orjson.loads(ANSWER)),
        ("lookup: cache.plan(response_format)", lambda: cache.plan(RESPONSE_FORMAT)),
        ("check: parse + validate (valid)", checked(ANSWER)),
        ("per response: lookup + check", per_response),
        ("fenced: strip fence + parse + validate", checked(FENCED)),
        ("invalid: parse + validate + 3 errors", checked(INVALID)),
        ("compile: cold (what the cache saves)", cold_compile),
    ]
    results = [(name, per_op_ns(fn, args.seconds, args.rounds)) for name, fn in steps]
    body_ns, content_ns = results[0][1], results[1][1]
    print(f"response body {len(BODY)} B, content {len(ANSWER)} B, schema "
          f"{len(orjson.dumps(SCHEMA))} B; medians of {args.rounds} rounds")  # fmt: skip
    print(f"{'step':<42} {'ns/op':>10} {'x body parse':>13} {'x content parse':>16}")
    for name, ns in results:
        print(f"{name:<42} {ns:>10.0f} {ns / body_ns:>13.2f} {ns / content_ns:>16.2f}")


if __name__ == "__main__":
    main()
