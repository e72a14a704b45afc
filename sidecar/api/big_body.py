"""A large request body parsed and checked a slice at a time, other requests served between.

orjson parses a body in one call that holds the event loop (and the GIL) for all of it: ~2-4 ms
for a 470 KB body of 15,000 objects, ~30 ms at `limits.max_body_bytes`' 20 MiB, while every
other request of the process waits. From `SLICED_FROM_BYTES` a body is instead fed to ijson's
C push parser (yajl) `SLICE_BYTES` at a time (a read never ends inside a string: `_Slices`),
the loop turning between slices; its depth is then checked by orjson's probe (one call:
~0.3-0.7 ms for 500 KB) a part of the body at a time.
When the request is done the body is freed in slices (`release`): freeing 15,000 objects when
the last reference goes is itself one C call of ~0.4-1 ms. The part of the body its endpoint's
checks serialize whole is measured in slices too (`measure_part`). Every turn between slices
goes through the process's `Lane` (sidecar/api/lane.py): while other requests are in flight,
this work waits its share of the loop. Smaller bodies keep orjson's one call
(`parse_json_object`): cheaper, and too short to matter.

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
from collections.abc import Awaitable, Callable
from gc import is_tracked
from itertools import filterfalse, islice
from typing import Any

import ijson
import orjson

from sidecar.api.common import MAX_JSON_DEPTH, fits_depth_at, parse_json_object, too_deep
from sidecar.api.lane import UNSHARED, Lane, Slicer
from sidecar.errors import invalid_request
from sidecar.json_size import SIZE_NESTING, Sizes

log = logging.getLogger("ringside")

SLICED_FROM_BYTES = 64 * 1024  # below, orjson's one call holds the loop ~0.1-0.3 ms
SLICE_BYTES = 2048  # yajl: ~30-90 µs a slice of dense JSON (8 KiB: 15 % less CPU, 4x the wait)
TURN_NS = 30_000  # a walk over a body lets the loop turn when it has held it this long
# (at 0.1 ms, and 512 members a batch, a walk's slices were 0.1-0.25 ms: now 35-60 µs)
_WALK_BATCH = 128  # members of a wide container taken at a time
_WIDE = 64  # a container with more members is taken a slice of members at a time
_NARROW_VISITS = 2048  # narrow containers a walk over a body takes one by one, at most
_CONTAINERS = frozenset({dict, list})  # all that ijson builds
_CLEAR_AT_ONCE = 4096  # a dict of up to this many members is emptied in one call (~0.05-0.2 ms)
_KEYS_BATCH = 4096  # a dict's keys freed at a time (~15 ns each)


# What yajl reads where orjson refuses: vertical tab or form feed (yajl's whitespace; inside a
# string both refuse them), and a high-surrogate escape (yajl takes a lone one as "?").
# (a literal prefix: sre finds it by a fast search, not a step per byte)
_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")
_LOW_SURROGATE = re.compile(rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}")


class _OrjsonDecides(Exception):
    """The body holds something yajl reads differently (the message says what): parse it with
    orjson instead."""


class _Slices:
    """The body as ijson's asynchronous file: a slice per read, a turn of the loop before it.

    A read never ends inside a string: yajl lexes a token that spans reads again from its start
    at every read, so a 1.3 MB string fed 2 KiB at a time cost 250 ms (quadratic; a base64 image,
    a pasted document). A read that would end inside one is extended to the string's closing
    quote: yajl lexes it once (~3 ns a byte, one step of the loop: ~3 ms for a 1 MB string). A
    number longer than a slice, which would do the same, is orjson's to decide (no real number
    has that many digits)."""

    def __init__(self, raw: bytes | bytearray, slicer: Slicer) -> None:
        self.raw = raw
        self.view = memoryview(raw)  # a slice of it copied once (a bytearray's slice is a copy)
        self.at = 0
        self.slicer = slicer

    async def read(self, size: int) -> bytes:
        await self.slicer.turn()
        raw, start = self.raw, self.at
        end = min(start + min(size, SLICE_BYTES), len(raw))
        chunk = bytes(self.view[start:end])  # the one copy yajl is handed, mostly
        self.at = end
        if end < len(raw):
            if _quotes(chunk) & 1:  # it ends inside a string (every read starts outside one)
                self.at = await self._string_end(end, _ends_escaping(chunk))
                return bytes(self.view[start : self.at])
            if raw[end - 1] in _NUMBER_BYTES and not chunk.translate(None, _NUMBER_BYTES):
                raise _OrjsonDecides(f"a number longer than {SLICE_BYTES} bytes")
        return chunk

    async def _string_end(self, at: int, escaped: bool) -> int:
        """Where the string the body is inside at `at` ends: past its closing quote (the body's
        end if it has none). `escaped`: the byte at `at` is escaped."""
        raw = self.raw
        at += escaped
        while (quote := raw.find(b'"', at)) >= 0:
            if not _backslashes_before(raw, quote, at) & 1:
                return quote + 1
            at = quote + 1  # an escaped quote: the string goes on
            if self.slicer.held_ns() > TURN_NS:  # a string of many escaped quotes
                await self.slicer.turn()
        return len(raw)


_NUMBER_BYTES = b"0123456789+-.eE"
_ESCAPE = re.compile(rb"\\[\s\S]")  # a backslash and the byte it escapes
_BACKSLASH_RUN = 4096  # bytes looked at a time for the backslashes before a quote


def _quotes(chunk: bytes) -> int:
    """How many unescaped quotes `chunk` holds (it starts outside a string, or where a string
    starts: never in an escape)."""
    if b"\\" in chunk:  # escapes are only in strings: each escaped byte dropped
        chunk = _ESCAPE.sub(b"", chunk)
    return chunk.count(b'"')


def _ends_escaping(chunk: bytes) -> bool:
    """Whether `chunk` (inside a string at its end) ends on a backslash that escapes the next
    byte: an odd run of them."""
    return bool(_backslashes_before(chunk, len(chunk), 0) & 1)


def _backslashes_before(raw: Any, at: int, start: int) -> int:
    """How many backslashes come right before `at`, from `start` on, counted in C a window at a
    time (a hostile run of them can be megabytes)."""
    count = 0
    while at > start:
        window = bytes(raw[max(at - _BACKSLASH_RUN, start) : at])
        run = len(window) - len(window.rstrip(b"\\"))
        count += run
        if run < len(window):
            break
        at -= run
    return count


def _check_suspects(raw: bytes | bytearray, start: int, end: int) -> None:
    if raw.find(b"\x0b", start, end) >= 0 or raw.find(b"\x0c", start, end) >= 0:
        raise _OrjsonDecides("a vertical tab or form feed")
    for match in _HIGH_SURROGATE.finditer(raw, start, end):
        at = match.start()
        # an escape only after an even run of backslashes before its own ("\\ud800" is text);
        # a high surrogate only when a low one follows
        if not _backslashes_before(raw, at, 0) & 1 and not _LOW_SURROGATE.match(raw, at + 6):
            raise _OrjsonDecides("a lone surrogate escape")


async def parse_large_json_object(
    raw: bytes | bytearray, lane: Lane = UNSHARED, values: int | None = None
) -> dict[str, object]:
    """`parse_json_object` for a large body, the loop turning between slices (on `lane`'s
    terms): the same object or the same 400. `values`: at most how many values the body holds
    (sidecar/api/body_memory.py counts them), which bounds what orjson may read again."""
    slicer = lane.slicer()
    try:
        await _find_suspects(raw, slicer)  # before anything is built (freeing it is one step)
        body = await _parsed(raw, slicer)
    except Exception as exc:  # _OrjsonDecides, or anything yajl refuses (ijson.JSONError...)
        return _decided(raw, values, _reason(exc))
    if not isinstance(body, dict):  # refused: orjson says why (not an object, or too deep)
        return _decided(raw, values, _NOT_AN_OBJECT, body, lane)
    if not await _fits_depth(body, _Walk(slicer)):  # orjson's refusal: too deep, or past its own
        return _decided(raw, values, _TOO_DEEP, body, lane)
    return body


_SCANNED_BYTES = 32 * 1024  # looked at for suspects between two turns of the loop


async def _find_suspects(raw: bytes | bytearray, slicer: Slicer) -> None:
    """`_OrjsonDecides` if the body holds what yajl reads otherwise than orjson, looked for a
    part at a time."""
    for start in range(0, len(raw), _SCANNED_BYTES):
        # from 5 bytes back: a surrogate escape may straddle the parts
        _check_suspects(raw, max(start - 5, 0), start + _SCANNED_BYTES)
        await slicer.turn()


ORJSON_DECIDES_MAX_VALUES = 20_000  # orjson reads that many again in ~1-4 ms (one step)
_NOT_AN_OBJECT = "not an object"
_TOO_DEEP = "too deep"


def _decided(
    raw: bytes | bytearray,
    values: int | None,
    reason: str,
    parsed: Any = None,
    lane: Lane = UNSHARED,
) -> dict[str, object]:
    """orjson's reading of a body the sliced one could not decide, when it is short: up to
    `ORJSON_DECIDES_MAX_VALUES` values (a body of 680,000 small values took ~130 ms, one step of
    the loop, any client's to cause). Past that, the body is refused for what the sliced reading
    found, without orjson's position of it: integers past 64 bits and numbers past 1e308, which
    orjson reads as floats or refuses, are then refused. What the sliced reading built, `parsed`,
    is freed in slices (a body yajl refuses halfway is freed by it in one step: ~40 ns a value
    built)."""
    if values is None or values <= ORJSON_DECIDES_MAX_VALUES:
        return parse_json_object(raw)
    if type(parsed) in _CONTAINERS:  # what the sliced reading built, freed a slice at a time
        release(parsed, lane)
    if reason == _NOT_AN_OBJECT:
        raise invalid_request("the request body must be a JSON object")
    if reason == _TOO_DEEP:
        raise too_deep()
    raise invalid_request(f"the request body is not valid JSON: {reason}")


def _reason(exc: Exception) -> str:
    """What the sliced reading refused, in a line that does not quote the body (yajl's
    message goes on to show it)."""
    first_line = str(exc).partition("\n")[0].strip()
    return first_line or type(exc).__name__


async def _parsed(raw: bytes | bytearray, slicer: Slicer) -> Any:
    if _YAJL is None:  # no C backend: ijson's pure-Python one is slower than orjson's block
        raise _OrjsonDecides("no yajl")
    parsed: Any = None
    # One value and nothing after it (trailing data is an ijson.JSONError). Each read of
    # _Slices suspends (asyncio.sleep(0)): measured with ijson 3.6, a read that returns without
    # suspending can make yajl2_c's asynchronous reader lose data.
    async for value in _YAJL.items(_Slices(raw, slicer), "", use_float=True, buf_size=SLICE_BYTES):
        parsed = value
    return parsed


def _yajl() -> Any:
    try:
        return ijson.get_backend("yajl2_c")
    except ImportError:
        return None


_YAJL = _yajl()


class _Walk:
    """What a walk over a body shares: how many narrow containers it may still take one by one
    (a body of small containers costs ~1 µs a container that way, ~30 times what one call over
    all of them does: past `_NARROW_VISITS` each is taken whole, and as the walk goes a level
    at a time, they are by then the small subtrees at the bottom), and when the loop last
    turned."""

    def __init__(self, slicer: Slicer) -> None:
        self.narrow = _NARROW_VISITS
        self.slicer = slicer

    def one_by_one(self, count: int) -> bool:
        """Whether `count` more narrow containers may be taken one by one."""
        self.narrow -= count
        return self.narrow >= 0

    async def turn(self) -> None:
        """Let the loop turn if the walk has held it `TURN_NS`."""
        if self.slicer.held_ns() > TURN_NS:
            await self.slicer.turn()


def paced(lane: Lane) -> Callable[[], Awaitable[None]]:
    """A turn of the loop to await between parts of some large-body work: it turns once the
    work has held the loop `TURN_NS`, on `lane`'s terms."""
    return _Walk(lane.slicer()).turn


async def _fits_depth(body: dict[str, object], walk: _Walk) -> bool:
    """Whether `body` nests at most MAX_JSON_DEPTH levels: orjson's probe (`fits_depth_at`)
    on a part at a time, a level of the body at a time, the loop turning between parts. A
    narrow container's containers go to the next level (while the walk may take them one by
    one, else each is probed whole); a wide one's members are probed `_WALK_BATCH` at a time
    (in a list, which stands at the container's level), its wide members going to the next
    level. Nothing changes the body meanwhile: it is not handed out yet."""
    nodes: list[Any] = [body]
    level = 1
    while nodes:
        if level > MAX_JSON_DEPTH:
            return False
        below: list[Any] = []
        for node in nodes:
            members = iter(node.values() if type(node) is dict else node)
            if len(node) <= _WIDE:
                inner = [m for m in members if type(m) in _CONTAINERS]
                if walk.one_by_one(len(inner)):
                    below += inner
                elif not all(fits_depth_at(m, level + 1) for m in inner):
                    return False
            else:
                while batch := list(islice(members, _WALK_BATCH)):
                    wide = [m for m in batch if type(m) in _CONTAINERS and len(m) > _WIDE]
                    if wide:
                        below += wide
                        batch = [
                            m for m in batch if not (type(m) in _CONTAINERS and len(m) > _WIDE)
                        ]
                    if not fits_depth_at(batch, level):
                        return False
                    await walk.turn()
            await walk.turn()
        nodes, level = below, level + 1
    return True


_SIZED_FROM_BYTES = 1024  # a container's size is kept from this size


async def measure_part(part: object, lane: Lane) -> Sizes:
    """The serialized sizes of a part of a body and of the containers of 1 KiB or more inside
    it, a slice at a time: what `sidecar.json_size.serialized_size` reads instead of
    serializing a large part in one call (the `response_format` bound). None measured for a
    part that is not a container (it is small: serialized at once)."""
    sizes: Sizes = {}
    walk = _Walk(lane.slicer())
    if type(part) in _CONTAINERS:
        await _measure(part, sizes, walk, 1)
    await walk.slicer.turn()
    return sizes


async def _measure(value: Any, sizes: Sizes, walk: _Walk, depth: int) -> int:
    """len(orjson.dumps(value)) for a container, its members a batch at a time: a wide
    member, or a narrow one that holds containers while the walk may take them one by one,
    measured on its own (and kept in `sizes` from `_SIZED_FROM_BYTES`), the others serialized
    together (a schema's 15,000 small property objects: 1.2 ms, not 5.5 ms one by one)."""
    count = len(value)
    if not count or depth > SIZE_NESTING:
        return len(orjson.dumps(value))
    is_dict = type(value) is dict
    # "{" and "}", a colon per member, count - 1 commas; or "[" and "]" and the commas
    total = 1 + 2 * count if is_dict else 1 + count
    items = iter(value.items() if is_dict else value)
    while chunk := list(islice(items, _WALK_BATCH)):
        if is_dict:  # the keys serialized together: 2 brackets and a comma less than keys
            total += len(orjson.dumps([key for key, _ in chunk])) - 1 - len(chunk)
            batch = [member for _, member in chunk]
        else:
            batch = chunk
        # Only containers are tracked by the collector, and a dict of scalars is not (CPython
        # untracks it): what is not tracked is serialized with the batch, found in C.
        alone: list[Any] = []
        tracked = list(filter(is_tracked, batch))
        rest = list(filterfalse(is_tracked, batch)) if tracked else batch
        for m in tracked:
            (alone if m and (len(m) > _WIDE or walk.one_by_one(1)) else rest).append(m)
        for member in alone:
            total += await _measure(member, sizes, walk, depth + 1)
        if rest:
            total += len(orjson.dumps(rest)) - 1 - len(rest)
        await walk.turn()
    if total >= _SIZED_FROM_BYTES:
        sizes[id(value)] = (value, total)
    return total


_HOLD_CHECKS = 100  # how many times `release` looks whether it holds the body's last reference
_HOLD_PAUSE = 0.01  # seconds between two looks


def release(
    body: dict[str, object], lane: Lane = UNSHARED, freed: Callable[[], None] | None = None
) -> None:
    """Free a large body in slices once nothing else holds it (its request is done); a body
    still held after a second is left to reference counting. `freed` is called at the end
    (the body's memory share given back: sidecar/api/body_memory.py)."""
    # No reference kept to the task (module state would be shared by every app): it only ever
    # waits on a turn of the loop or a timer, and the loop holds it through either.
    asyncio.ensure_future(_release(body, lane, freed))  # noqa: RUF006


async def _release(body: dict[str, object], lane: Lane, freed: Callable[[], None] | None) -> None:
    try:
        for _ in range(_HOLD_CHECKS):
            await asyncio.sleep(0)
            if sys.getrefcount(body) <= _ALONE:  # this frame's name and getrefcount's argument
                break
            await asyncio.sleep(_HOLD_PAUSE)
        else:
            return
        nodes: list[Any] = [body]
        del body
        try:
            await _take_apart(nodes, _Walk(lane.slicer()))
        except Exception:  # whatever is left is freed by reference counting, as it would be
            log.exception("freeing a large request body in slices")
    finally:
        if freed is not None:
            freed()


async def _take_apart(nodes: list[Any], walk: _Walk) -> None:
    """Free the containers in `nodes` (nothing else holds them) a slice at a time, a level of
    the body at a time: each emptied, a narrow one's containers kept for the next level (while
    the walk may take them one by one, else freed whole), a wide one's members let go of
    `_WALK_BATCH` at a time, its wide members kept for the next level.

    Only what nothing else holds is ever emptied: a container kept for the next level is
    emptied there only if `nodes` is then all that holds it (its parent emptied by then).
    Anything else is let go of, which frees nothing that someone still holds."""
    while nodes:
        below: list[Any] = []
        for node in nodes:
            if sys.getrefcount(node) > _IN_A_LIST:  # something else holds it: leave it whole
                continue
            if len(node) <= _WIDE:
                members = node.values() if type(node) is dict else node
                inner = [m for m in members if type(m) in _CONTAINERS and m]
                del members
                node.clear()  # its scalars freed; its containers stay in `inner`
                if walk.one_by_one(len(inner)):
                    below += inner
                del inner  # or freed whole
            else:
                await _let_go_of_members(node, below, walk)
            await walk.turn()
        nodes.clear()  # the emptied containers of this level, freed (~30 ns each)
        await walk.turn()
        nodes = below


async def _let_go_of_members(node: Any, below: list[Any], walk: _Walk) -> None:
    """Empty a wide container `_WALK_BATCH` members at a time: its wide members onto `below`,
    the others let go of (a dict's keys with them; a dict of up to `_CLEAR_AT_ONCE` members is
    cleared in one call, its keys and members kept in lists and let go of in slices)."""
    keys: list[str] = []
    if type(node) is dict:
        while len(node) > _CLEAR_AT_ONCE:  # ~100 ns a member: past this, emptied in batches
            batch = [node.popitem()[1] for _ in range(_WALK_BATCH)]
            below += [m for m in batch if type(m) in _CONTAINERS and len(m) > _WIDE]
            del batch
            await walk.turn()
        keys, members = list(node), list(node.values())
        node.clear()  # ~10 ns a member: its keys and members stay, in the two lists
    else:
        members = node
    while members:
        batch = members[-_WALK_BATCH:]
        del members[-_WALK_BATCH:]
        below += [m for m in batch if type(m) in _CONTAINERS and len(m) > _WIDE]
        del batch  # the other members, let go of
        await walk.turn()
    while keys:
        del keys[-_KEYS_BATCH:]
        await walk.turn()


def _references_alone(value: object) -> int:
    return sys.getrefcount(value)


def _references_in_a_list() -> int:
    nodes: list[object] = [{}]
    for node in nodes:
        return sys.getrefcount(node)
    raise AssertionError


# A value's references when one name holds it, and when a list does and a loop's name: with
# getrefcount's argument, what `_release` and `_take_apart` compare with (where more,
# something else holds it).
_ALONE = _references_alone({})
_IN_A_LIST = _references_in_a_list()
