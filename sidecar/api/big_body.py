"""A large request body parsed and checked a slice at a time, other requests served between.

orjson parses a body in one call that holds the event loop (and the GIL) for all of it: ~2-4 ms
for a 470 KB body of 15,000 objects, ~30 ms at `limits.max_body_bytes`' 20 MiB, while every
other request of the process waits. From `SLICED_FROM_BYTES` a body is instead fed to ijson's
C push parser (yajl) `SLICE_BYTES` at a time, the loop turning between slices; its depth is
then checked by orjson's probe (one call: ~0.3-0.7 ms for 500 KB) a part of the body at a time.
When the request is done the body is freed in slices (`release`): freeing 15,000 objects when
the last reference goes is itself one C call of ~0.4-1 ms. Smaller bodies keep orjson's one
call (`parse_json_object`): cheaper, and too short to matter.

The answer is exactly orjson's: the same objects, the same refusals with the same messages.
Where yajl reads a body differently (it takes a lone high-surrogate escape, vertical tab and form
feed as whitespace, depths past orjson's 1,024; it refuses integers past 64 bits, which orjson
reads as floats) or refuses it at all, orjson decides, in one call as before: only a body that
is refused, or holds one of these, costs that.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from itertools import islice
from typing import Any

import ijson

from sidecar.api.common import MAX_JSON_DEPTH, fits_depth_at, parse_json_object

log = logging.getLogger("ringside")

SLICED_FROM_BYTES = 64 * 1024  # below, orjson's one call holds the loop ~0.1-0.3 ms
SLICE_BYTES = 8192  # yajl: ~0.1 ms a slice of dense JSON
TURN_NS = 250_000  # a walk over a body lets the loop turn when it has held it this long
_WALK_BATCH = 512  # members of a wide container taken at a time
_WIDE = 64  # a container with more members is taken a slice of members at a time
_NARROW_VISITS = 2048  # narrow containers a walk over a body takes one by one, at most
_CONTAINERS = frozenset({dict, list})  # all that ijson builds
_CLEAR_AT_ONCE = 16384  # a dict of up to this many members is emptied in one call (~0.2 ms)
_KEYS_BATCH = 4096  # a dict's keys freed at a time (~15 ns each)


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


async def parse_large_json_object(raw: bytes) -> dict[str, object]:
    """`parse_json_object` for a large body, the loop turning between slices: the same object
    or the same 400."""
    try:
        body = await _parsed(raw)
    except Exception:  # _OrjsonDecides, or anything yajl refuses (ijson.JSONError and others)
        return parse_json_object(raw)
    if not isinstance(body, dict):  # refused: orjson says why (not an object, or too deep)
        return parse_json_object(raw)
    if not await _fits_depth(body, 1, _Walk()):
        return parse_json_object(raw)  # orjson's refusal: too deep, or past its own depth
    return body


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


class _Walk:
    """What a walk over a body shares: how many narrow containers it may still take one by
    one (a body of small containers costs ~1 µs a container that way, ~30 times what one call
    over all of them does, so past `_NARROW_VISITS` they are taken whole), and when the loop
    last turned."""

    def __init__(self) -> None:
        self.narrow = _NARROW_VISITS
        self.since = time.perf_counter_ns()

    def one_by_one(self) -> bool:
        self.narrow -= 1
        return self.narrow >= 0

    async def turn(self) -> None:
        """Let the loop turn if the walk has held it `TURN_NS`."""
        if time.perf_counter_ns() - self.since > TURN_NS:
            await asyncio.sleep(0)
            self.since = time.perf_counter_ns()


async def _fits_depth(node: Any, level: int, walk: _Walk) -> bool:
    """Whether `node`, a container at `level` of the body, fits MAX_JSON_DEPTH: orjson's probe
    (`fits_depth_at`) on a part at a time, the loop turning between parts: a narrow
    container's containers one by one, a wide one's members `_WALK_BATCH` at a time (in a list,
    which stands at the container's level), a wide member in turn."""
    if level > MAX_JSON_DEPTH:
        return False
    members = iter(node.values() if type(node) is dict else node)
    if len(node) <= _WIDE:
        for member in members:
            if type(member) not in _CONTAINERS:
                continue
            if walk.one_by_one():
                if not await _fits_depth(member, level + 1, walk):
                    return False
            elif not fits_depth_at(member, level + 1):
                return False
        await walk.turn()
        return True
    while batch := list(islice(members, _WALK_BATCH)):  # nothing changes the body meanwhile
        wide = [m for m in batch if type(m) in _CONTAINERS and len(m) > _WIDE]
        if wide:
            batch = [m for m in batch if not (type(m) in _CONTAINERS and len(m) > _WIDE)]
        if not fits_depth_at(batch, level):
            return False
        await walk.turn()
        for member in wide:
            if not await _fits_depth(member, level + 1, walk):
                return False
    return True


_HOLD_CHECKS = 100  # how many times `release` looks whether it holds the body's last reference
_HOLD_PAUSE = 0.01  # seconds between two looks


def release(body: dict[str, object]) -> None:
    """Free a large body in slices once nothing else holds it (its request is done); a body
    still held after a second is left to reference counting."""
    # No reference kept to the task (module state would be shared by every app): it only ever
    # waits on a turn of the loop or a timer, and the loop holds it through either.
    asyncio.ensure_future(_release(body))  # noqa: RUF006


async def _release(body: dict[str, object]) -> None:
    for _ in range(_HOLD_CHECKS):
        await asyncio.sleep(0)
        if sys.getrefcount(body) <= _ALONE:  # this frame's name and getrefcount's argument
            break
        await asyncio.sleep(_HOLD_PAUSE)
    else:
        return
    try:
        await _take_apart(body, _Walk())
    except Exception:  # whatever is left is freed by reference counting, as it would have been
        log.exception("freeing a large request body in slices")


async def _take_apart(node: Any, walk: _Walk) -> None:
    """Free `node`, which nothing else holds, a slice at a time: a narrow container's
    containers one by one, a wide one's members `_WALK_BATCH` at a time, a wide member taken
    apart in turn.

    Only what nothing else holds is ever emptied: `node`, and each container taken out of it
    whose only reference is then this function's (`_ALONE`). Anything else is let go of, which
    frees nothing that someone still holds."""
    if len(node) > _WIDE:
        await _take_apart_wide(node, walk)
        return
    members = list(node.values()) if type(node) is dict else list(node)
    node.clear()  # its members stay, in `members`
    del node
    while members:
        member = members.pop()
        if (
            type(member) in _CONTAINERS
            and member
            and sys.getrefcount(member) <= _ALONE
            and walk.one_by_one()
        ):
            await _take_apart(member, walk)
        del member
    await walk.turn()


async def _take_apart_wide(node: Any, walk: _Walk) -> None:
    """`_take_apart` for a wide container: `_WALK_BATCH` members at a time out of it, freed
    (a wide member taken apart in turn), and a dict's keys `_KEYS_BATCH` at a time."""
    keys: list[str] = []
    if type(node) is dict:
        while len(node) > _CLEAR_AT_ONCE:  # ~100 ns a member: past this, emptied in batches
            await _let_go([node.popitem()[1] for _ in range(_WALK_BATCH)], walk)
        keys, members = list(node), list(node.values())
        node.clear()  # ~10 ns a member: its keys and members stay, in the two lists
        del node
        while members:
            batch = members[-_WALK_BATCH:]
            del members[-_WALK_BATCH:]
            await _let_go(batch, walk)
    else:
        while node:
            batch = node[-_WALK_BATCH:]
            del node[-_WALK_BATCH:]
            await _let_go(batch, walk)
    while keys:
        del keys[-_KEYS_BATCH:]
        await walk.turn()


async def _let_go(batch: list[Any], walk: _Walk) -> None:
    """Let go of a batch of members taken out of a container (each is freed unless something
    else holds it), a wide one nothing else holds taken apart first."""
    wide = [m for m in batch if type(m) in _CONTAINERS and len(m) > _WIDE]
    batch.clear()  # the other members, freed
    await walk.turn()
    while wide:
        member = wide.pop()
        if sys.getrefcount(member) <= _ALONE:
            await _take_apart(member, walk)
        del member


def _references_alone(value: object) -> int:
    return sys.getrefcount(value)


# A value's references when a function's name is its only holder: the name and getrefcount's
# argument (what `_release` and `_take_apart` compare with: where more, something else holds it).
_ALONE = _references_alone({})
