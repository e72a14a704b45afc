"""Idempotency claims and stored answers in the embedded default store: one SQLite file in WAL
mode, surviving restarts.

Each operation runs in a `BEGIN IMMEDIATE` transaction (shared with the operations queued at
the same time, each in its own savepoint: `ThreadedSqlite`'s group commit, on the event loop
when the write lock is free at once, else on the connection's thread), so it is atomic also
against other processes on the same file (`serve --workers N`), which wait for the write lock.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sidecar.stores.base import Claim, ClaimState
from sidecar.stores.sqlite_thread import ThreadedSqlite

T = TypeVar("T")

PURGE_EVERY = 60.0  # seconds between deletes of expired rows


class Database(ThreadedSqlite):
    """The idempotency database: `run` calls `fn(connection, *args)` in one transaction."""

    def __init__(self, path: str, schema: str) -> None:
        super().__init__(path, "ringside-sqlite", schema, synchronous="NORMAL", commit_on_loop=True)

    async def open(self) -> None:
        await self._run(self._conn)  # errors as they are: a bad path stops the start

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(connection, *args)` in a transaction on the database thread (group commit)."""
        result: T = await self._enqueue(fn, *args)
        return result


IDEMPOTENCY_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    token TEXT NOT NULL,          -- '' once completed
    record BLOB,
    expires_at REAL NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID
"""


class SqliteIdempotency:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock
        self._next_purge = 0.0

    def _begin(
        self, conn: sqlite3.Connection, scope: str, key: str, fingerprint: str, lease: float
    ) -> Claim:
        now = self._clock()
        if now >= self._next_purge:
            self._next_purge = now + PURGE_EVERY
            conn.execute("DELETE FROM idempotency WHERE expires_at <= ?", (now,))
        row = conn.execute(
            "SELECT fingerprint, record, expires_at FROM idempotency WHERE scope = ? AND key = ?",
            (scope, key),
        ).fetchone()
        if row is None or row[2] <= now:
            token = os.urandom(16).hex()
            conn.execute(
                "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?, NULL, ?)",
                (scope, key, fingerprint, token, now + lease),
            )
            return Claim(ClaimState.OWNED, token=token)
        if row[0] != fingerprint:
            return Claim(ClaimState.CONFLICT)
        if row[1] is not None:
            return Claim(ClaimState.DONE, record=bytes(row[1]))
        return Claim(ClaimState.RUNNING)

    async def begin(self, scope: str, key: str, fingerprint: str, lease: float) -> Claim:
        return await self._db.run(self._begin, scope, key, fingerprint, lease)

    def _update(
        self, conn: sqlite3.Connection, scope: str, key: str, token: str, sql: str, values: tuple
    ) -> bool:
        cursor = conn.execute(
            sql + " WHERE scope = ? AND key = ? AND token = ? AND token != '' AND expires_at > ?",
            (*values, scope, key, token, self._clock()),
        )
        return cursor.rowcount == 1

    async def extend(self, scope: str, key: str, token: str, lease: float) -> bool:
        sql = "UPDATE idempotency SET expires_at = ?"
        return await self._db.run(self._update, scope, key, token, sql, (self._clock() + lease,))

    async def complete(self, scope: str, key: str, token: str, record: bytes, ttl: float) -> bool:
        sql = "UPDATE idempotency SET token = '', record = ?, expires_at = ?"
        values = (record, self._clock() + ttl)
        return await self._db.run(self._update, scope, key, token, sql, values)

    async def release(self, scope: str, key: str, token: str) -> None:
        await self._db.run(self._update, scope, key, token, "DELETE FROM idempotency", ())


class SqliteStore:
    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.db = Database(path, IDEMPOTENCY_SCHEMA)
        self.idempotency = SqliteIdempotency(self.db, clock)

    @classmethod
    async def open(cls, path: str, clock: Callable[[], float] = time.time) -> SqliteStore:
        store = cls(path, clock)
        try:
            await store.db.open()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        await self.db.close()
