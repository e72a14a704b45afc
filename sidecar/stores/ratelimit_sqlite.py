"""The rate limiter of `serve --workers N` on the sqlite store: GCRA cells in the shared file.

Every worker reads and writes the cells of a request in one `BEGIN IMMEDIATE` transaction
(group commit: with the other checks queued at the same time), so the workers together admit
exactly what one process would. Time is the wall clock (TATs outlive a reboot in the file;
the monotonic clock would not). A cell's row is deleted once the cell is full again.

A single process keeps its cells in memory instead (MemoryLimiter): exact, and no thread hop.
With the file unusable (locked past the timeout, disk full) the limiter falls back to limiting
in this process alone and logs a warning (once per outage, sidecar/outage.py); requests are
never refused because of the store.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence

from sidecar.outage import Outage
from sidecar.stores.base import StoreUnavailable
from sidecar.stores.ratelimit_base import PERIOD, Cell, Verdict, decide
from sidecar.stores.ratelimit_memory import MemoryLimiter
from sidecar.stores.sqlite_thread import ThreadedSqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS ratelimit_cell (key TEXT PRIMARY KEY, tat REAL NOT NULL)
WITHOUT ROWID;
"""
ACQUIRED_LOCALLY = "requests limited in this process alone"
ADJUSTED_LOCALLY = "token adjustments made in this process alone"
_SET_TAT = (
    "INSERT INTO ratelimit_cell (key, tat) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET tat = excluded.tat"
)


class SqliteLimiter(ThreadedSqlite):
    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        super().__init__(
            path, "ringside-ratelimit-db", SCHEMA, synchronous="NORMAL", commit_on_loop=True
        )
        self.clock = clock
        self.fallback = MemoryLimiter()
        self._next_sweep = 0.0
        self.outage = Outage("ratelimit")  # its metrics: set by the RateLimits addon

    def _acquire(self, db: sqlite3.Connection, cells: Sequence[Cell]) -> Verdict:
        now = self.clock()
        tats: list[float | None] = []
        for cell in cells:
            row = db.execute("SELECT tat FROM ratelimit_cell WHERE key = ?", (cell.key,)).fetchone()
            tats.append(row[0] if row else None)
        verdict = decide(cells, tats, now)
        if verdict.admitted:
            db.executemany(
                _SET_TAT,
                [
                    (cell.key, now + backlog)
                    for cell, backlog in zip(cells, verdict.backlogs, strict=True)
                ],
            )
        if now >= self._next_sweep:  # full cells need no row
            self._next_sweep = now + PERIOD
            db.execute("DELETE FROM ratelimit_cell WHERE tat < ?", (now,))
        return verdict

    def _adjust(self, db: sqlite3.Connection, shifts: Sequence[tuple[str, float]]) -> None:
        now = self.clock()
        for key, seconds in shifts:
            row = db.execute("SELECT tat FROM ratelimit_cell WHERE key = ?", (key,)).fetchone()
            new = max(row[0] if row else now, now) + seconds
            if new > now:
                db.execute(_SET_TAT, (key, new))
            else:
                db.execute("DELETE FROM ratelimit_cell WHERE key = ?", (key,))

    async def acquire(self, cells: Sequence[Cell]) -> Verdict:
        try:
            verdict: Verdict = await self._enqueue(self._acquire, cells)
        except StoreUnavailable as exc:
            self.outage.failed("acquire", ACQUIRED_LOCALLY, exc)
            return self.fallback.check(cells)
        if self.outage.down:
            self.outage.answered()
        return verdict

    def adjust(self, shifts: Sequence[tuple[str, float]]) -> None:
        sent = self._enqueue(self._adjust, shifts)

        def adjusted(_: object) -> None:
            exc = None if sent.cancelled() else sent.exception()
            if exc is not None:
                self.outage.failed("adjust", ADJUSTED_LOCALLY, exc)
                self.fallback.adjust(shifts)

        sent.add_done_callback(adjusted)
