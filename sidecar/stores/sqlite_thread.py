"""A sqlite connection owned by one thread: the event loop only awaits futures.

sqlite3 calls block; running them on a single dedicated thread keeps the loop free and means
the connection is never used by two threads. The connection opens lazily, in that thread.

Writes that many requests make at once go through `_enqueue` (group commit): the calls queued
while the thread is busy, or in the same event-loop turn, share one thread hop and one
`BEGIN IMMEDIATE` transaction, each call in its own savepoint, in arrival order. Each call sees
the writes of those before it exactly as if they had committed one by one, and one that raises
is rolled back alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sidecar.stores.base import StoreUnavailable

T = TypeVar("T")
_Call = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]
OPEN_ATTEMPTS = 50  # about 12 s of retries in all
CLOSE_WAIT_SECONDS = 5.0  # how long close() waits for queued group-commit calls


class ThreadedSqlite:
    """Base for the sqlite-backed stores: `_run(fn, …)` runs `fn` on the connection's thread."""

    def __init__(self, path: str, thread_name: str, schema: str, synchronous: str) -> None:
        self.path = path
        self._schema = schema
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=thread_name)
        self._db: sqlite3.Connection | None = None
        self._queue: list[_Call] = []
        self._busy = False  # a batch is queued or on the thread: later calls wait for the next

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._db = self._connect()
        return self._db

    def _connect(self) -> sqlite3.Connection:
        """Connect, switch to WAL and create the tables. Workers starting together race for
        this, and sqlite answers some of those races "locked" at once, without waiting for
        the busy timeout: try again for a while."""
        for attempt in range(OPEN_ATTEMPTS):
            db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(f"PRAGMA synchronous={self._synchronous}")
                db.executescript(self._schema)
                return db
            except sqlite3.OperationalError as exc:
                db.close()
                if "locked" not in str(exc) or attempt == OPEN_ATTEMPTS - 1:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- group commit ----------------------------------------------------------------------
    def _enqueue(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Queue `fn(db, *args)` for the next shared transaction; the future holds its result
        or its exception (sqlite errors as StoreUnavailable)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((fn, args, future))
        if not self._busy:
            self._busy = True
            loop.call_soon(self._flush)  # after this turn: take what else the turn queued
        return future

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        done = asyncio.wrap_future(self._executor.submit(self._apply, batch))
        done.add_done_callback(lambda applied: self._deliver(batch, applied))

    def _apply(self, batch: list[_Call]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        with self._transaction() as db:
            for fn, args, _ in batch:
                db.execute("SAVEPOINT call")
                try:
                    outcomes.append((True, fn(db, *args)))
                except Exception as exc:
                    db.execute("ROLLBACK TO call")
                    outcomes.append((False, exc))
                db.execute("RELEASE call")
        return outcomes

    def _deliver(self, batch: list[_Call], applied: asyncio.Future[list[tuple[bool, Any]]]) -> None:
        if applied.cancelled():
            failed: BaseException | None = StoreUnavailable(f"sqlite {self.path}: closed")
        else:
            failed = applied.exception()
        outcomes = applied.result() if failed is None else [(False, failed)] * len(batch)
        for (_, _, future), (ok, value) in zip(batch, outcomes, strict=True):
            if future.done():
                continue  # the caller was cancelled; what it asked for is done all the same
            if ok:
                future.set_result(value)
            elif isinstance(value, sqlite3.Error):
                future.set_exception(StoreUnavailable(f"sqlite {self.path}: {value}"))
            else:
                future.set_exception(value)
        if self._queue:
            self._flush()
        else:
            self._busy = False

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def close(self) -> None:
        """Finish the queued group-commit calls (a few seconds at most), then close."""
        waited = 0.0
        while self._busy and waited < CLOSE_WAIT_SECONDS:
            await asyncio.sleep(0.01)
            waited += 0.01
        await self._run(self._close)
        self._executor.shutdown(wait=True)
