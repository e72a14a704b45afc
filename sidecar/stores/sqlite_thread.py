"""A sqlite connection per store, its writes committed in groups, off the event loop only when
they would wait.

Writes that many requests make at once go through `_enqueue` (group commit): the calls queued
in the same event-loop turn, or while an earlier group is on the thread, share one
`BEGIN IMMEDIATE` transaction, in arrival order. Each call sees the writes of those before it
exactly as if they had committed one by one, and one that raises is rolled back alone (the
group runs again with a savepoint per call: `_group`). A call nobody waits for (a usage
record's finish) may wait a little for company (`later`).

Where a group runs (`commit_on_loop`, for the `synchronous=NORMAL` stores): a WAL commit at
NORMAL writes its pages to the WAL file and does not wait for the disk, so a group whose write
lock is free at once (one process, or no other worker writing just then) runs on the event loop
itself, in tens of microseconds — where a hop to the connection's thread and back took two
wake-ups (≈ 0.1–0.2 ms at concurrency 1, and most of the store's CPU per request). A group that
would wait (another process holds the lock, or a read or an earlier group is on the thread)
goes to the connection's own thread, whose connection waits for the lock as before. The loop's
connection never checkpoints (`wal_autocheckpoint=0`): that is what waits for the disk (an
fdatasync of the WAL and of the database, 1–10 ms) and it was the sqlite store's p99 at
concurrency 1. A checkpointer thread per file (`Checkpointer`) does it instead, beside the
writers. Stores at `synchronous=FULL` (the redis store's journal) keep every group on the thread.

Reads and other one-off calls go through `_run`, always on the thread; the connections open
lazily there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

from sidecar.stores.base import StoreUnavailable

T = TypeVar("T")
_Call = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]
_Outcomes = list[tuple[bool, Any]]
OPEN_ATTEMPTS = 50  # about 12 s of retries in all
CLOSE_WAIT_SECONDS = 5.0  # how long close() waits for queued group-commit calls
CHECKPOINT_SECONDS = 0.2  # how often the checkpointer copies the WAL into the database
CHECKPOINT_RESTART_FRAMES = 4096  # a WAL that stays this long (16 MiB) is restarted (below)
LATER_SECONDS = 0.02  # how long a call queued with later=True may wait for company


class Checkpointer:
    """Copies a WAL file's pages into its database, beside the writers, on a thread of its own.

    Every CHECKPOINT_SECONDS: a PASSIVE checkpoint, which takes no lock a writer needs (writers
    go on appending meanwhile). The WAL starts over from its beginning only when a writer finds
    every frame copied, and under continuous writes that moment never comes (frames land while
    the checkpoint waits for its fdatasync): once the WAL holds CHECKPOINT_RESTART_FRAMES, the
    passive checkpoint is followed by a RESTART one, which holds the write lock while it copies
    what was written since (a few milliseconds' worth) and starts the WAL over — a pause of the
    writers once per 16 MiB of WAL. One per file and process, shared by its stores."""

    _open: ClassVar[dict[str, tuple[Checkpointer, int]]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ringside-checkpoint", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, path: str) -> Checkpointer:
        with cls._lock:
            found, users = cls._open.get(path, (None, 0))
            if found is None:
                found = Checkpointer(path)
            cls._open[path] = (found, users + 1)
            return found

    def release(self) -> None:
        with self._lock:
            found, users = self._open[self.path]
            if users > 1:
                self._open[self.path] = (found, users - 1)
                return
            del self._open[self.path]
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        db: sqlite3.Connection | None = None
        try:
            while not self._stop.wait(CHECKPOINT_SECONDS):
                try:
                    if db is None:
                        db = sqlite3.connect(self.path, isolation_level=None, timeout=1.0)
                    self.checkpoint(db)
                except sqlite3.Error:
                    pass  # locked, or the file is gone: the next round tries again
        finally:
            if db is not None:
                db.close()

    @staticmethod
    def checkpoint(db: sqlite3.Connection) -> None:
        _, frames, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if frames >= CHECKPOINT_RESTART_FRAMES:  # frames written meanwhile are not counted
            db.execute("PRAGMA wal_checkpoint(RESTART)")


class ThreadedSqlite:
    """Base for the sqlite-backed stores: `_run(fn, …)` runs `fn` on the connection's thread,
    `_enqueue(fn, …)` runs `fn(db, …)` in the next group commit (module docstring)."""

    def __init__(
        self,
        path: str,
        thread_name: str,
        schema: str,
        synchronous: str,
        commit_on_loop: bool = False,
    ) -> None:
        self.path = path
        self._schema = schema
        self._synchronous = synchronous
        self._commit_on_loop = commit_on_loop
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=thread_name)
        self._db: sqlite3.Connection | None = None
        self._loop_db: sqlite3.Connection | None = None  # opened on the thread, used on the loop
        self._checkpointer: Checkpointer | None = None
        self._queue: list[_Call] = []
        self._busy = False  # a group is queued or on the thread: later calls wait for the next
        self._later: asyncio.TimerHandle | None = None  # flushes calls that may wait (below)
        self._on_thread = 0  # calls submitted to the thread and not yet seen done by the loop

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        self._on_thread += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._on_thread -= 1

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._db = self._connect(timeout=10.0)
            if self._commit_on_loop:
                # no wait for a lock on the loop: a busy group goes to the thread instead
                self._loop_db = self._connect(timeout=0.0, check_same_thread=False)
                self._checkpointer = Checkpointer.acquire(os.path.abspath(self.path))
        return self._db

    def _connect(self, timeout: float, check_same_thread: bool = True) -> sqlite3.Connection:
        """Connect, switch to WAL and create the tables. Workers starting together race for
        this, and sqlite answers some of those races "locked" at once, without waiting for
        the busy timeout: try again for a while."""
        for attempt in range(OPEN_ATTEMPTS):
            db = sqlite3.connect(
                self.path,
                isolation_level=None,
                timeout=10.0,
                check_same_thread=check_same_thread,
            )
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(f"PRAGMA synchronous={self._synchronous}")
                if self._commit_on_loop:
                    db.execute("PRAGMA wal_autocheckpoint=0")  # the Checkpointer's job
                db.executescript(self._schema)
                db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
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
    def _enqueue(
        self, fn: Callable[..., Any], *args: Any, later: bool = False
    ) -> asyncio.Future[Any]:
        """Queue `fn(db, *args)` for the next shared transaction; the future holds its result
        or its exception (sqlite errors as StoreUnavailable). `later`: nobody waits for it,
        so it may wait up to LATER_SECONDS for the next call that somebody does wait for, and
        share its transaction (at concurrency 1 a request's usage record goes in with the
        next request's reserve)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((fn, args, future))
        if self._busy:
            return future
        if not later:
            self._busy = True
            loop.call_soon(self._flush)  # after this turn: take what else the turn queued
        elif self._later is None:
            self._later = loop.call_later(LATER_SECONDS, self._flush_later)
        return future

    def _flush_later(self) -> None:
        self._later = None
        if not self._busy and self._queue:
            self._busy = True
            self._flush()

    def _flush(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        batch, self._queue = self._queue, []
        if self._loop_db is not None and self._on_thread == 0:
            outcomes = self._apply_on_loop(self._loop_db, batch)
            if outcomes is not None:
                self._settle_batch(batch, outcomes)
                self._next()
                return
        self._on_thread += 1
        done = asyncio.wrap_future(self._executor.submit(self._apply, batch))
        done.add_done_callback(lambda applied: self._deliver(batch, applied))

    def _apply_on_loop(self, db: sqlite3.Connection, batch: list[_Call]) -> _Outcomes | None:
        """The group in one transaction on the loop's connection; None, with nothing done, when
        the write lock is not free at once (the group then goes to the thread)."""
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            return None  # locked by another writer (or failing: the thread reports it)
        try:
            return _group(db, batch, may_wait=False)
        except _WouldWait:
            return None  # a statement met a lock after all: rolled back, redone on the thread
        except sqlite3.Error as exc:
            _rollback(db)
            return None if _would_wait(exc) else [(False, exc)] * len(batch)

    def _apply(self, batch: list[_Call]) -> _Outcomes:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            return _group(db, batch, may_wait=True)
        except BaseException:
            _rollback(db)
            raise

    def _deliver(self, batch: list[_Call], applied: asyncio.Future[_Outcomes]) -> None:
        self._on_thread -= 1
        if applied.cancelled():
            failed: BaseException | None = StoreUnavailable(f"sqlite {self.path}: closed")
        else:
            failed = applied.exception()
        outcomes = applied.result() if failed is None else [(False, failed)] * len(batch)
        self._settle_batch(batch, outcomes)
        self._next()

    def _settle_batch(self, batch: list[_Call], outcomes: _Outcomes) -> None:
        for (_, _, future), (ok, value) in zip(batch, outcomes, strict=True):
            if future.done():
                continue  # the caller was cancelled; what it asked for is done all the same
            if ok:
                future.set_result(value)
            elif isinstance(value, sqlite3.Error):
                future.set_exception(StoreUnavailable(f"sqlite {self.path}: {value}"))
            else:
                future.set_exception(value)

    def _next(self) -> None:
        if self._queue:
            asyncio.get_running_loop().call_soon(self._flush)
        else:
            self._busy = False

    def _close(self) -> None:
        for db in (self._loop_db, self._db):
            if db is not None:
                db.close()
        self._db = self._loop_db = None
        if self._checkpointer is not None:
            self._checkpointer.release()
            self._checkpointer = None

    async def close(self) -> None:
        """Finish the queued group-commit calls (a few seconds at most), then close."""
        if self._later is not None:
            self._flush_later()
        waited = 0.0
        while self._busy and waited < CLOSE_WAIT_SECONDS:
            await asyncio.sleep(0.01)
            waited += 0.01
        await self._run(self._close)
        self._executor.shutdown(wait=True)


class _WouldWait(Exception):
    """A statement of a group on the loop met a lock; the group was rolled back."""


def _group(db: sqlite3.Connection, batch: list[_Call], may_wait: bool) -> _Outcomes:
    """The group's calls in the transaction just begun, then COMMIT. Optimistic: the calls run
    one after another without savepoints (two statements a call saved); when one raises (a
    refused reserve), all is rolled back and the group runs again with a savepoint per call,
    so that only the one that raised is undone — a call alone is simply rolled back. The calls
    may run twice, so they keep no state but caches outside the database."""
    outcomes: _Outcomes = []
    for fn, args, _ in batch:
        try:
            outcomes.append((True, fn(db, *args)))
        except Exception as exc:
            _rollback(db)
            if not may_wait and _would_wait(exc):
                raise _WouldWait from exc
            if len(batch) == 1:
                return [(False, exc)]
            db.execute("BEGIN IMMEDIATE")
            return _apart(db, batch, may_wait)
    db.execute("COMMIT")
    return outcomes


def _apart(db: sqlite3.Connection, batch: list[_Call], may_wait: bool) -> _Outcomes:
    """The group again, each call in its own savepoint, then COMMIT."""
    outcomes: _Outcomes = []
    for fn, args, _ in batch:
        db.execute("SAVEPOINT call")
        try:
            outcomes.append((True, fn(db, *args)))
        except Exception as exc:
            if not may_wait and _would_wait(exc):
                _rollback(db)
                raise _WouldWait from exc
            db.execute("ROLLBACK TO call")
            outcomes.append((False, exc))
        db.execute("RELEASE call")
    db.execute("COMMIT")
    return outcomes


def _rollback(db: sqlite3.Connection) -> None:
    """Roll back what is open (an I/O error may have ended the transaction already)."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def _would_wait(exc: BaseException) -> bool:
    """sqlite's answer to a lock it would have had to wait for (busy timeout 0)."""
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )
