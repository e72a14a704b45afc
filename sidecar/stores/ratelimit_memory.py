"""The in-process rate limiter: GCRA cells in a dict, on the monotonic clock.

The limiter of `storage.backend: memory`, and of `sqlite` in one process (which holds the
state; several workers share the sqlite file instead), and the stand-in of the shared limiters
while their store is unreachable. A check is dictionary lookups and arithmetic; cells that are
full again are swept once per period, so memory stays proportional to the callers of the last
minute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from sidecar.stores.ratelimit_base import PERIOD, Cell, Verdict, decide


class MemoryLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._tat: dict[str, float] = {}
        self._clock = clock
        self._next_sweep = clock() + PERIOD

    def check(self, cells: Sequence[Cell]) -> Verdict:
        now = self._clock()
        tats = self._tat
        verdict = decide(cells, [tats.get(cell.key) for cell in cells], now)
        if verdict.admitted:
            for cell, backlog in zip(cells, verdict.backlogs, strict=True):
                tats[cell.key] = now + backlog
            if now >= self._next_sweep:
                self._sweep(now)
        return verdict

    async def acquire(self, cells: Sequence[Cell]) -> Verdict:
        return self.check(cells)

    def adjust(self, shifts: Sequence[tuple[str, float]]) -> None:
        now = self._clock()
        tats = self._tat
        for key, seconds in shifts:
            tat = tats.get(key, now)
            new = (tat if tat > now else now) + seconds
            if new > now:
                tats[key] = new
            else:
                tats.pop(key, None)

    def _sweep(self, now: float) -> None:
        self._tat = {key: tat for key, tat in self._tat.items() if tat > now}
        self._next_sweep = now + PERIOD

    async def close(self) -> None:
        self._tat.clear()
