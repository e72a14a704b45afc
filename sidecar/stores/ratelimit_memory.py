"""The in-process rate limiter: GCRA cells in a dict, on the monotonic clock.

The default for `storage.backend: memory | sqlite` (one process holds the state; with
`serve --workers N` each worker limits on its own), and the stand-in of the redis limiter while
Redis is unreachable. A check is dictionary lookups and arithmetic; cells that are full again
are swept once per period, so memory stays proportional to the callers of the last minute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from sidecar.stores.ratelimit_base import PERIOD, Cell, Verdict


class MemoryLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._tat: dict[str, float] = {}
        self._clock = clock
        self._next_sweep = clock() + PERIOD

    def check(self, cells: Sequence[Cell]) -> Verdict:
        now = self._clock()
        tats = self._tat
        news: list[float] = []
        refused, worst = -1, 0.0
        for index, cell in enumerate(cells):
            tat = tats.get(cell.key, now)
            if tat < now:
                tat = now
            new = tat + cell.cost * cell.interval
            over = new - now - PERIOD - cell.slack
            if over > worst:
                refused, worst = index, over
            news.append(new)
        if refused >= 0:
            backlogs = [max(tats.get(cell.key, now) - now, 0.0) for cell in cells]
            return Verdict(False, backlogs, refused, worst)
        for cell, new in zip(cells, news, strict=True):
            tats[cell.key] = new
        if now >= self._next_sweep:
            self._sweep(now)
        return Verdict(True, [new - now for new in news])

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
