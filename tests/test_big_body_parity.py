"""A large body parsed in slices (sidecar/api/big_body.py) reads exactly as orjson reads it.

Bodies from `SLICED_FROM_BYTES` on are parsed by ijson's yajl in slices, not by orjson in one
call. Each case here is a tricky value inside a body padded past that size, read both ways: the
same object (types included: 1 is not 1.0), or the same 400 with the same message. Each is
also placed across a slice boundary, where a parser that keeps state between slices can slip.
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from sidecar.api.big_body import SLICE_BYTES, SLICED_FROM_BYTES, parse_large_json_object
from sidecar.api.common import MAX_JSON_DEPTH, parse_json_object
from sidecar.errors import GatewayError


def nested(levels: int, inner: bytes = b"1") -> bytes:
    return b"[" * levels + inner + b"]" * levels


# name -> the JSON text of the value of "v" in {"pad": "...", "v": <value>}
VALUES: dict[str, bytes] = {
    "floats": b"[0.1, 1e308, 5e-324, -0.0, 1E2, 1.7976931348623157e308, 2.5e-3, 1e-400, 0.0]",
    "float digits": b"3.14159265358979323846264338327950288419716939937510582097494459",
    "float too large": b"1e400",
    "negative float too large": b"-1e400",
    "integer beyond 64 bits": b"123456789012345678901234567890",
    "u64 max": b"18446744073709551615",
    "u64 max + 1": b"18446744073709551616",
    "i64 max": b"9223372036854775807",
    "i64 min": b"-9223372036854775808",
    "i64 min - 1": b"-9223372036854775809",
    "minus zero integer": b"-0",
    "NaN": b"NaN",
    "Infinity": b"Infinity",
    "-Infinity": b"-Infinity",
    "duplicate keys": b'{"a": 1, "b": 2, "a": 3}',
    "invalid UTF-8": b'"\xff"',
    "overlong UTF-8": b'"\xc0\xaf"',
    "UTF-8 encoded surrogate": b'"\xed\xa0\x80"',
    "lone high surrogate escape": b'"\\ud800 and text"',
    "high surrogate escape then a letter escape": b'"\\ud800\\u0041"',
    "two high surrogate escapes": b'"\\ud800\\ud800\\udc00"',
    "lone low surrogate escape": b'"\\udc00"',
    "surrogate pair escape": b'"\\ud83d\\ude00"',
    "escaped backslash then ud800 as text": b'"\\\\ud800"',
    "three backslashes: an escape after a backslash": b'"\\\\\\ud800"',
    "escapes": b'"\\u00e9\\/\\b\\f\\n\\r\\t\\"\\\\ \\u0000"',
    "non-ASCII": '"é ü \u2028 \U0001f600 \uffff"'.encode(),
    "control character in a string": b'"a\x01b"',
    "tab in a string": b'"a\tb"',
    "vertical tab as whitespace": b"[1,\x0b2]",
    "form feed as whitespace": b"[1,\x0c2]",
    "vertical tab in a string": b'"a\x0bb"',
    "comment": b"[1 /* no */]",
    "trailing comma": b"[1,]",
    "leading zero": b"01",
    "plus sign": b"+1",
    "bare dot": b"1.",
    "single quotes": b"'a'",
    "unquoted key": b"{a: 1}",
    "true misspelt": b"tru",
    "empty containers": b'[[], {}, [[]], {"a": {}}]',
    "whitespace everywhere": b' [ 1 , \n\t\r { "a" : [ ] } ] ',
    f"{MAX_JSON_DEPTH - 1} levels (the limit)": nested(MAX_JSON_DEPTH - 1),
    f"{MAX_JSON_DEPTH} levels (one too many)": nested(MAX_JSON_DEPTH),
    "the limit with an empty array inside": nested(MAX_JSON_DEPTH - 2, b"[]"),
    "one too many with an empty array inside": nested(MAX_JSON_DEPTH - 1, b"[]"),
    "the limit in objects": b'{"a":' * (MAX_JSON_DEPTH - 1) + b"1" + b"}" * (MAX_JSON_DEPTH - 1),
    "orjson's depth (1,024 with the body)": nested(1023),
    "past orjson's depth": nested(1024),
    "far past orjson's depth": nested(5000),
    "unterminated": b"[1, 2",
    "escaped quotes and backslashes": b'"a\\"b\\\\c\\\\\\"d\\\\"',
    "a string of escaped quotes": b'"' + b'\\"' * 3000 + b'"',
    "a long string then a value": b'["' + b"s" * 5000 + b'", 1]',
    "a long unterminated string": b'"' + b"s" * 5000,
    "an escape at the body's end": b'"abc\\',
    "a 5,000-digit integer": b"1" * 5000,
    "a 5,000-digit float": b"1." + b"1" * 5000,
    "a long number in an array": b"[1, " + b"2" * 5000 + b", 3]",
}
# whole bodies: what is around the padded object
BODIES: dict[str, bytes] = {
    "trailing data": b'{"pad": "PAD"} x',
    "a second value": b'{"pad": "PAD"} {}',
    "trailing whitespace": b'{"pad": "PAD"} \n\t\r ',
    "leading whitespace": b' \n{"pad": "PAD"}',
    "byte order mark": b'\xef\xbb\xbf{"pad": "PAD"}',
    "an array": b'["PAD"]',
    "a string": b'"PAD"',
    "nothing but the object, deep": b'{"pad": "PAD", "v": ' + nested(MAX_JSON_DEPTH - 1) + b"}",
}


def padded(before: int, value: bytes, after: int = 0) -> bytes:
    """{"pad": 0, <before spaces> "v": value, "tail": "<after y>"}: `value` starts at a chosen
    offset; the body is past SLICED_FROM_BYTES. (Spaces, not a string: a read that would end
    inside a string goes on to its end, so a value after one would start a read.)"""
    head = b'{"pad": 0,' + b" " * before + b'"v": '
    tail_pad = max(after, SLICED_FROM_BYTES - len(head) - len(value))
    return head + value + b', "tail": "' + b"y" * tail_pad + b'"}'


def outcome_of_orjson(raw: bytes) -> tuple[str, Any]:
    try:
        return "ok", parse_json_object(raw)
    except GatewayError as error:
        return "refused", (error.status, error.code, error.param, error.message)


async def outcome_in_slices(raw: bytes) -> tuple[str, Any]:
    assert len(raw) >= SLICED_FROM_BYTES
    try:
        return "ok", await parse_large_json_object(raw)
    except GatewayError as error:
        return "refused", (error.status, error.code, error.param, error.message)


def exactly(value: Any) -> Any:
    """What distinguishes values orjson would write differently (1 from 1.0, -0.0 from 0.0,
    key order), compared without recursion limits."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:  # deeper than orjson writes: compare the Python values
        return value


async def assert_same(raw: bytes) -> tuple[str, Any]:
    expected = outcome_of_orjson(raw)
    got = await outcome_in_slices(raw)
    assert got[0] == expected[0], (got, expected)
    if expected[0] == "ok":
        assert exactly(got[1]) == exactly(expected[1])
    else:
        assert got[1] == expected[1]
    return got


# where the value starts: at the start of a slice, across a boundary, just before one
OFFSETS = [0, SLICE_BYTES - 3 - 20, SLICE_BYTES - 20 - 1, 2 * SLICE_BYTES - 20 + 4]


@pytest.mark.parametrize("name", VALUES)
@pytest.mark.parametrize("offset", OFFSETS)
async def test_a_tricky_value_reads_the_same(name: str, offset: int) -> None:
    # the value starts `offset` bytes into the body, give or take the 20 of its head
    await assert_same(padded(offset, VALUES[name]))


@pytest.mark.parametrize("shift", range(12))
async def test_an_escape_across_a_slice_boundary_reads_the_same(shift: int) -> None:
    """Every byte of a string's escapes on the boundary in turn: a read that ends inside the
    string goes on to its closing quote, not to an escaped one."""
    value = b'"ab\\"c\\\\\\"d\\\\", "e\\\\"'
    for before in (SLICE_BYTES - 20 - shift, 2 * SLICE_BYTES - 20 - shift):
        kind, body = await assert_same(padded(before, b"[" + value + b"]"))
        assert kind == "ok" and body["v"] == ['ab"c\\"d\\', "e\\"]


@pytest.mark.parametrize("name", BODIES)
async def test_a_tricky_body_reads_the_same(name: str) -> None:
    raw = BODIES[name].replace(b"PAD", b"x" * SLICED_FROM_BYTES)
    await assert_same(raw)


async def test_what_orjson_refuses_is_refused_with_its_message() -> None:
    """The cases above compare two readings; these pin that refusals stay refusals."""
    for name in ("lone high surrogate escape", "vertical tab as whitespace", "past orjson's depth"):
        kind, (status, code, _param, message) = await assert_same(padded(0, VALUES[name]))
        assert (kind, status, code) == ("refused", 400, "invalid_request")
        assert message.startswith("the request body is not valid JSON: "), message
    kind, (_status, _code, _param, message) = await assert_same(
        padded(0, VALUES[f"{MAX_JSON_DEPTH} levels (one too many)"])
    )
    assert kind == "refused" and f"more than {MAX_JSON_DEPTH} levels" in message
    kind, body = await assert_same(padded(0, VALUES["integer beyond 64 bits"]))
    assert kind == "ok" and body["v"] == 1.2345678901234568e29  # orjson's reading: a float


async def test_random_documents_read_the_same() -> None:
    rng = random.Random(16)

    def value(depth: int) -> Any:
        roll = rng.random()
        if depth > 5 or roll < 0.35:
            return rng.choice(
                [0, -7, 2**40, 0.5, -1e-9, 1e300, "", "x" * rng.randint(1, 50), "é\u2028\U0001f600",
                 "\"\\/\n", None, True, False]
            )  # fmt: skip
        if roll < 0.7:
            return {f"k{i}": value(depth + 1) for i in range(rng.randint(0, 8))}
        return [value(depth + 1) for _ in range(rng.randint(0, 8))]

    for round_ in range(40):
        document = {
            "pad": "x" * rng.randint(SLICED_FROM_BYTES, SLICED_FROM_BYTES + 3 * SLICE_BYTES)
        }
        document.update({f"v{i}": value(0) for i in range(20)})
        option = orjson.OPT_INDENT_2 if round_ % 2 else 0
        raw = orjson.dumps(document, option=option)
        kind, _body = await assert_same(raw)
        assert kind == "ok"
        # and with one byte changed: whatever orjson makes of it, the sliced reading agrees
        at = rng.randrange(SLICED_FROM_BYTES, len(raw))
        await assert_same(raw[:at] + bytes([rng.choice(b'{}[]",:\\x0 \x0b\xff')]) + raw[at + 1 :])


LONG = 70_000
# name -> the JSON text of a value holding a string that spans many reads (one is extended to its
# closing quote)
LONG_VALUES: dict[str, bytes] = {
    "ASCII": b'"' + b"x" * LONG + b'"',
    "non-ASCII": orjson.dumps("é😀中a" * (LONG // 9)),
    "dense escapes": b'"' + b'\\n\\"\\\\\\u00e9\\ud83d\\ude00/' * (LONG // 25) + b'"',
    "in an array, twice": b'["' + b"a" * LONG + b'", 1, "' + b"b" * LONG + b'"]',
    "nested": b'{"a": [{"b": "' + b"c" * LONG + b'"}]}',
    "as a key": b'{"' + b"k" * LONG + b'": 1}',
    "a control character at its end": b'"' + b"x" * LONG + b'\x01"',
    "a lone surrogate escape at its end": b'"' + b"x" * LONG + b'\\ud800"',
    "an invalid escape in the middle": b'"' + b"x" * LONG + b"\\q" + b"x" * LONG + b'"',
    "invalid UTF-8 in the middle": b'"' + b"x" * LONG + b"\xff" + b"x" * 100 + b'"',
    "unterminated": b'"' + b"x" * LONG,
}


@pytest.mark.parametrize("name", LONG_VALUES)
async def test_a_long_string_reads_the_same(name: str) -> None:
    await assert_same(padded(0, LONG_VALUES[name]))
