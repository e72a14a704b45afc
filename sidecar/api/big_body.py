"""A large request body parsed and checked a slice at a time, other requests served between.

orjson parses a body in one call that holds the event loop (and the GIL) for all of it: ~2-4 ms
for a 470 KB body of 15,000 objects, ~30 ms at `limits.max_body_bytes`' 20 MiB, while every
other request of the process waits. From `SLICED_FROM_BYTES` a body is instead fed to ijson's
C push parser (yajl) `SLICE_BYTES` at a time, the loop turning between slices; its depth is then
found by a walk of its containers a level at a time, which also lets the loop turn, and the
levels are kept to free the body in slices when the request is done (`release`): freeing 15,000
objects when the last reference goes is itself one C call of ~0.4-0.8 ms. Smaller bodies keep
orjson's one call (`parse_json_object`): cheaper, and too short to matter.

The answer is exactly orjson's: the same objects, the same refusals with the same messages.
Where yajl reads a body differently (it takes a lone high-surrogate escape, vertical tab and form
feed as whitespace, depths past orjson's 1,024; it refuses integers past 64 bits, which orjson
reads as floats) or refuses it at all, orjson decides, in one call as before: only a body that
is refused, or holds one of these, costs that.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from itertools import chain, islice
from typing import Any

import ijson

from sidecar.api.common import MAX_JSON_DEPTH, parse_json_object, too_deep

SLICED_FROM_BYTES = 64 * 1024  # below, orjson's one call holds the loop ~0.1-0.3 ms
SLICE_BYTES = 8192  # yajl: ~0.1 ms a slice of dense JSON
TURN_NS = 250_000  # a walk lets the loop turn when it has held it this long
_WALK_BATCH = 512  # members looked at between two looks at the clock
_CONTAINERS = frozenset({dict, list})  # all that ijson builds
_ORJSON_MAX_DEPTH = 1024  # orjson.loads refuses more levels ("depth limit exceeded")

# What yajl reads where orjson refuses: vertical tab or form feed (yajl's whitespace; inside a
# string both refuse them), and a high-surrogate escape (yajl takes a lone one as "?").
# (a literal prefix: sre finds it by a fast search, not a step per byte)
_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")
_LOW_SURROGATE = re.compile(rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}")


class _OrjsonDecides(Exception):
    """The body holds something yajl reads differently: parse it with orjson instead."""


class _Slices:
    """The body as ijson's asynchronous file: a slice per read, a turn of the loop before it."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.at = 0

    async def read(self, size: int) -> bytes:
        await asyncio.sleep(0)
        raw, start = self.raw, self.at
        end = min(start + min(size, SLICE_BYTES), len(raw))
        self.at = end
        _check_suspects(raw, max(start - 5, 0), end)  # a match may straddle the last slice
        return raw[start:end]


def _check_suspects(raw: bytes, start: int, end: int) -> None:
    if raw.find(b"\x0b", start, end) >= 0 or raw.find(b"\x0c", start, end) >= 0:
        raise _OrjsonDecides
    for match in _HIGH_SURROGATE.finditer(raw, start, end):
        at = match.start()
        backslashes = 1
        while at - backslashes >= 0 and raw[at - backslashes] == 0x5C:
            backslashes += 1
        # an escape only after an odd run of backslashes ("\\ud800" is text); a high surrogate
        # only when a low one follows
        if backslashes % 2 and not _LOW_SURROGATE.match(raw, at + 6):
            raise _OrjsonDecides


Levels = list[list[Any]]  # a parsed body's containers: [[the body], its containers, theirs, ...]


async def parse_large_json_object(raw: bytes) -> tuple[dict[str, object], Levels | None]:
    """`parse_json_object` for a large body, the loop turning between slices: the same object
    or the same 400; with the object, its levels for `release` (None where orjson parsed it)."""
    try:
        body = await _parsed(raw)
    except Exception:  # _OrjsonDecides, or anything yajl refuses (ijson.JSONError and others)
        return parse_json_object(raw), None
    if not isinstance(body, dict):  # refused: orjson says why (not an object, or too deep)
        return parse_json_object(raw), None
    levels = await containers(body, _ORJSON_MAX_DEPTH)
    if len(levels) > _ORJSON_MAX_DEPTH:  # orjson refuses it as invalid JSON, with its message
        return parse_json_object(raw), None
    if len(levels) > MAX_JSON_DEPTH:
        raise too_deep()
    return body, levels


async def _parsed(raw: bytes) -> Any:
    if _YAJL is None:  # no C backend: ijson's pure-Python one is slower than orjson's block
        raise _OrjsonDecides
    parsed: Any = None
    # One value and nothing after it (trailing data is an ijson.JSONError). Each read of
    # _Slices suspends (asyncio.sleep(0)): measured with ijson 3.6, a read that returns without
    # suspending can make yajl2_c's asynchronous reader lose data.
    async for value in _YAJL.items(_Slices(raw), "", use_float=True, buf_size=SLICE_BYTES):
        parsed = value
    return parsed


def _yajl() -> Any:
    try:
        return ijson.get_backend("yajl2_c")
    except ImportError:
        return None


_YAJL = _yajl()


async def containers(value: Any, cap: int) -> Levels:
    """`value`'s arrays and objects a level at a time (as many levels as it nests, an empty one
    counted; the walk stops past `cap` levels), the loop turning every `TURN_NS`."""
    levels: Levels = [[value]]
    since = time.perf_counter_ns()
    while len(levels) <= cap:
        below: list[Any] = []
        members = chain.from_iterable(map(_members, levels[-1]))
        while batch := list(islice(members, _WALK_BATCH)):
            below += [member for member in batch if type(member) in _CONTAINERS]
            since = await _turn(since)
        if not below:
            break
        levels.append(below)
    return levels


def _members(node: Any) -> Any:
    return node.values() if type(node) is dict else node


_RELEASING: set[asyncio.Task[None]] = set()
_HOLD_CHECKS = 100  # how many times `release` looks whether it holds the body's last reference
_HOLD_PAUSE = 0.01  # seconds between two looks


def release(levels: Levels | None) -> None:
    """Free a large body's containers (`levels`, from `parse_large_json_object`) in slices,
    once nothing else holds the body (its request is done): emptied from the top, each level's
    containers freed when nothing holds them but the level. A container something else still
    holds is left as it is; a body still held after a second is left to reference counting."""
    if levels is None:
        return
    task = asyncio.ensure_future(_release(levels))
    _RELEASING.add(task)
    task.add_done_callback(_RELEASING.discard)


async def _release(levels: Levels) -> None:
    for _ in range(_HOLD_CHECKS):
        await asyncio.sleep(0)
        if not any(_refs(body) > _OURS for body in levels[0]):
            break
        await asyncio.sleep(_HOLD_PAUSE)
    else:
        return
    since = time.perf_counter_ns()
    for level in levels:
        for start in range(0, len(level), _WALK_BATCH):
            for node in islice(level, start, start + _WALK_BATCH):
                if _refs(node) <= _OURS:  # else someone else holds it
                    since = await _empty(node, since)
            since = await _turn(since)
        while level:  # the emptied containers, freed
            del level[-_WALK_BATCH:]
            since = await _turn(since)


async def _empty(node: Any, since: int) -> int:
    """Empty one container a batch of members at a time (its containers stay: the level below
    holds them); the last time the loop turned."""
    if len(node) <= _WALK_BATCH:
        node.clear()
        return since
    if type(node) is list:
        while node:
            del node[-_WALK_BATCH:]
            since = await _turn(since)
        return since
    while node:
        for _ in range(min(_WALK_BATCH, len(node))):
            node.popitem()
        since = await _turn(since)
    return since


async def _turn(since: int) -> int:
    """Let the loop turn if this has held it `TURN_NS`; the last time it turned."""
    if time.perf_counter_ns() - since > TURN_NS:
        await asyncio.sleep(0)
        return time.perf_counter_ns()
    return since


def _refs(node: Any) -> int:
    return sys.getrefcount(node)


def _refs_of_ours() -> int:
    level: list[dict[str, object]] = [{}]
    for node in level:
        return _refs(node)
    raise AssertionError


# The references to a container held by a level's list alone, counted where `_release` counts
# them: the list, the loop's name, `_refs`' parameter, getrefcount's argument.
_OURS = _refs_of_ours()
