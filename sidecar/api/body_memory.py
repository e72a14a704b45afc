"""What large request bodies hold of a worker's memory at once, and its bound.

Parsed, a JSON body takes many times its size: 20 MiB of `[[],[],…]` is ~7 million lists, and
one such request took the sidecar from 53 to 556 MiB of RSS, past the pod manifests' 256 MiB; and
`limits.max_body_bytes` bounds one body, not how many arrive at once. So a body from
`SLICED_FROM_BYTES` (a large one: parsed in slices, sidecar/api/big_body.py) holds a share of
`limits.max_body_memory_bytes` while its request runs: its bytes, taken as they arrive (not
on what Content-Length promises: a client sending slowly, or never, would hold the share of
bytes it does not send), then, before it is parsed, what its objects will hold, counted from
its bytes a slice at a time (`parsed_objects`). A body that would take more than the whole
bound is `413 request_too_large` (before any of it is read when its Content-Length alone is
over); one that does not fit while others hold their shares waits up to `WAIT_SECONDS` for
room, then is `503 server_busy` with `Retry-After: 1` (the SDKs retry it). Its share is given
back once the body is freed (`big_body.release`). Smaller bodies are not counted: each is
under 64 KiB (~2 MB parsed at most), and the connection cap bounds how many there are.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sidecar.api.big_body import SLICED_FROM_BYTES
from sidecar.api.lane import Lane, Slicer
from sidecar.errors import GatewayError

# What one parsed value holds at most, with the reference to it: an empty list or dict (56-64
# bytes, the collector's 16-byte header, rounded up by the allocator) and its slot in its
# container (8, and a list's over-allocation); a number or a short string holds less. A
# string's characters are counted apart: at most one byte per byte of the body (ASCII).
OBJECT_BYTES = 96
WAIT_SECONDS = 1.0  # for room, before 503: what freeing the last large bodies takes, and more
_COUNTED_BYTES = 32 * 1024  # of the body counted between two turns of the loop (~10-40 µs)
_MIB = 1024 * 1024


class BodyMemory:
    """The bytes large bodies hold in one worker (an estimate: see the module's docstring)."""

    __slots__ = ("_freed", "_gauge", "_tally", "held")

    def __init__(self) -> None:
        self.held = 0
        self._freed = asyncio.Event()  # set, and replaced, when a share is given back
        self._tally: Any = None
        self._gauge: Any = None

    def attach(self, metrics: Any) -> None:
        """Show `held` as `ringside_body_memory_bytes` (made by the api app's start)."""
        self._tally, self._gauge = metrics.tally, metrics.body_memory
        if self.held:
            self._tally.inc(self._gauge, self.held)

    def reservation(self, limit: int) -> Reservation:
        """An empty share for one request's body, within `limit` bytes in all."""
        return Reservation(self, limit)

    async def room_for(self, amount: int, limit: int) -> None:
        """Until `amount` more fits in `limit`, or 503 after `WAIT_SECONDS`."""
        try:
            async with asyncio.timeout(WAIT_SECONDS):
                while self.held + amount > limit:
                    await self._freed.wait()
        except TimeoutError:
            raise memory_busy(limit) from None

    def _add(self, amount: int) -> None:
        self.held += amount
        if self._tally is not None:
            self._tally.inc(self._gauge, amount)
        if amount < 0:  # every waiter looks again
            self._freed.set()
            self._freed = asyncio.Event()


class Reservation:
    """One request's share of the bound: taken as its body grows, given back once."""

    __slots__ = ("held", "limit", "memory")

    def __init__(self, memory: BodyMemory, limit: int) -> None:
        self.memory = memory
        self.limit = limit  # limits.max_body_memory_bytes when the request came
        self.held = 0

    async def hold(self, total: int, what: str) -> None:
        """Hold `total` bytes in all for this body (more than now: the difference is taken), or
        refuse the request: 413 when `total` alone is over the bound, else, when the others'
        shares leave too little, wait up to `WAIT_SECONDS` for them to be given back (a client
        posting large bodies one after the other: the last one is still being freed), then 503.
        `what` says what the bytes are, for the message."""
        more = total - self.held
        if more <= 0:
            return
        self.refuse_over(total, what)
        if self.memory.held + more > self.limit:
            await self.memory.room_for(more, self.limit)
        self.held = total
        self.memory._add(more)

    def refuse_over(self, total: int, what: str) -> None:
        """413 when `total` bytes alone are over the bound (they could never be held)."""
        if total > self.limit:
            raise too_much_memory(total, self.limit, what)

    async def hold_bytes(self, total: int) -> None:
        """`read_body`'s `hold`: the body's bytes, from a large body's size."""
        if total >= SLICED_FROM_BYTES:
            await self.hold(total, "its bytes")

    async def hold_parsed(self, raw: bytes | bytearray, lane: Lane) -> int:
        """Hold what `raw` will hold parsed, counted in slices on `lane` before it is; how many
        values it holds at most."""
        objects = await parsed_objects(raw, lane.slicer())
        await self.hold(parsed_bytes(len(raw), objects), f"~{objects} values once parsed")
        return objects

    def give_back(self) -> None:
        if self.held:
            self.memory._add(-self.held)
            self.held = 0


async def parsed_objects(raw: bytes | bytearray, slicer: Slicer) -> int:
    """At most how many Python objects parsing `raw` makes, counted a slice at a time.

    Every value but the outermost follows a comma, follows a colon (an object member's value),
    or is an array's first member; every key precedes a colon. So values and keys together are
    at most 1 + commas + 2 x colons + opening brackets (those inside strings count too: the
    figure is an upper bound, ~1 % over for prose)."""
    objects = 1
    for start in range(0, len(raw), _COUNTED_BYTES):
        end = start + _COUNTED_BYTES
        objects += (
            raw.count(b",", start, end)
            + 2 * raw.count(b":", start, end)
            + raw.count(b"[", start, end)
        )
        await slicer.turn()
    return objects


def parsed_bytes(raw_bytes: int, objects: int) -> int:
    """What a body holds once parsed: its bytes, its strings' characters (at most as many) and
    its objects."""
    return 2 * raw_bytes + objects * OBJECT_BYTES


def too_much_memory(total: int, limit: int, what: str) -> GatewayError:
    return GatewayError(
        413,
        "request_too_large",
        f"the request body would hold {total / _MIB:.1f} MiB of the sidecar's memory ({what}), "
        f"more than limits.max_body_memory_bytes ({limit} bytes)",
    )


def memory_busy(limit: int) -> GatewayError:
    return GatewayError(
        503,
        "server_busy",
        "large request bodies in progress hold the sidecar's memory for them "
        f"(limits.max_body_memory_bytes, {limit} bytes); retry shortly",
        headers={"Retry-After": "1"},
    )
