"""The event loop's time, shared between ordinary requests and the work of large bodies.

A large body (from `big_body.SLICED_FROM_BYTES`) is parsed, checked and freed in slices, the
loop turning between them. Slices bound how long another request waits when its turn comes
during one, not how often that happens: with large bodies arriving back to back a slice runs
most of the time, and every step of every other request then waits one out (the soak measured
normal traffic's p99 at 3.4 times its figure alone). So large-body work is the loop's background
lane: while other requests work on the loop (a turn of the loop ran some of their work in the
last `_QUIET_NS`), it gets at most `LARGE_SHARE` of the loop's time (after a slice that held the
loop h ns the next one waits h x (1/share - 1), shared by every large body in progress). With
none in flight, or all of them waiting on their upstreams, as LLM calls mostly do, it goes on at
full speed: a wait would only leave the loop idle. What is left for the others is a slice
(~0.03-0.06 ms) at the few of their steps that meet one.

A large body's request is therefore slower while the process works for others: ~10 times its
work (~120 ms for the soak's 590 KB body) when the loop is never idle. That is the point: the one
who sends the large body waits for it, not everyone else.
"""

from __future__ import annotations

import asyncio
import time

LARGE_SHARE = 0.1  # of the loop's time, for large bodies' work while other requests work on it
_IDLE_TURN_NS = 20_000  # a turn of the loop this short ran nothing else (an empty one: ~1-3 µs)
_BUSY_SHARE = 0.25  # of a wait's time on the loop's CPU: the others worked during it
_QUIET_NS = 1_000_000  # others that have not worked on the loop this long are waiting elsewhere
# (steady traffic has a step every 0.1-0.3 ms: in the gaps between them a large body still waits)
_SLEEP_FROM_NS = 500_000  # a shorter wait is not slept (uvloop's timers count whole ms): it is
# owed, and paid with the next waits


class Lane:
    """One process's requests in flight and its large bodies' share of the loop."""

    __slots__ = ("_large_ns", "_next_ns", "_wait_per_held", "_worked_ns", "large", "requests")

    def __init__(self, share: float = LARGE_SHARE) -> None:
        self.requests = 0  # in flight (request_path.handle counts them)
        self.large = 0  # of them, those with a large body
        self._wait_per_held = 1 / share - 1
        self._next_ns = 0  # when large-body work may next run, while others are in flight
        self._worked_ns = 0  # when a turn of the loop last ran another request's work
        self._large_ns = 0  # what large-body slices have held the loop, in all

    def slicer(self) -> Slicer:
        """The turns of one piece of large-body work (a parse, a walk, a release)."""
        return Slicer(self)

    async def turn(self, held_ns: int) -> None:
        """Let the loop turn after a slice of large-body work that held it `held_ns`: what the
        others have ready runs first. The next slice comes at once when no other request is in
        flight, or when the others have not worked on the loop for `_QUIET_NS` (they wait on
        their upstreams, as LLM calls mostly do: waiting would only leave the loop idle), else
        when the share allows."""
        self._large_ns += held_ns
        large, started = self._large_ns, time.perf_counter_ns()
        await asyncio.sleep(0)
        now = time.perf_counter_ns()
        if self.requests <= self.large:
            self._next_ns = 0
            return
        # what ran in that turn, less the slices of other large bodies
        if now - started - (self._large_ns - large) >= _IDLE_TURN_NS:
            self._worked_ns = now
        elif now - self._worked_ns > _QUIET_NS:
            self._next_ns = 0
            return
        self._next_ns = max(self._next_ns, started) + int(held_ns * self._wait_per_held)
        wait = self._next_ns - now
        if wait >= _SLEEP_FROM_NS:
            large, cpu = self._large_ns, time.thread_time_ns()
            await asyncio.sleep(wait / 1e9)
            # the others worked meanwhile (an idle loop's own timers and turns: 3-10 %)
            if time.thread_time_ns() - cpu - (self._large_ns - large) >= wait * _BUSY_SHARE:
                self._worked_ns = time.perf_counter_ns()


class Slicer:
    """When one piece of large-body work last took the loop, to charge its slices."""

    __slots__ = ("lane", "since")

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.since = time.perf_counter_ns()

    def held_ns(self) -> int:
        return time.perf_counter_ns() - self.since

    async def turn(self) -> None:
        """End a slice: charge what it held to the lane and let the loop turn."""
        await self.lane.turn(self.held_ns())
        self.since = time.perf_counter_ns()


UNSHARED = Lane()  # no requests counted: large-body work outside a served app runs at full speed
