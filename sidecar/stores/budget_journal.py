"""A local outbox for the redis budget store: writes that could not reach redis wait here.

Each entry is one guarded Lua call (script name, keys, args) plus the money it moves, so that
a replay re-issues exactly the write that failed. The scripts apply an op id at most once, so
an entry replayed twice (redis applied it, then the sidecar died before deleting it here) is
not counted twice. A sqlite file, `synchronous=FULL`: an appended entry survives `kill -9`.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

T = TypeVar("T")


@dataclass(slots=True)
class Entry:
    script: str
    keys: list[str]
    args: list[Any]
    moves: list[tuple[str, str, int]] = field(default_factory=list)  # (scope, period id, nano)
    seq: int = 0

    def dump(self) -> bytes:
        return orjson.dumps(
            {"script": self.script, "keys": self.keys, "args": self.args, "moves": self.moves}
        )

    @classmethod
    def load(cls, seq: int, blob: bytes) -> Entry:
        data = orjson.loads(blob)
        moves = [(m[0], m[1], int(m[2])) for m in data.get("moves", ())]
        return cls(data["script"], data["keys"], data["args"], moves, seq)


class Journal:
    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ringside-journal")
        self._db: sqlite3.Connection | None = None
        self.pending = 0

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS journal "
                "(seq INTEGER PRIMARY KEY AUTOINCREMENT, entry BLOB NOT NULL)"
            )
            self._db = db
        return self._db

    def _open(self) -> list[Entry]:
        if not os.path.exists(self.path):
            return []
        return self._read(1_000_000)

    async def open(self) -> list[Entry]:
        """Entries left by an earlier run (an existing file is read; none is created)."""
        entries = await self._run(self._open)
        self.pending = len(entries)
        return entries

    def _append(self, entries: Sequence[Entry]) -> None:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            for entry in entries:
                db.execute("INSERT INTO journal (entry) VALUES (?)", (entry.dump(),))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def append(self, entries: Sequence[Entry]) -> None:
        await self._run(self._append, entries)
        self.pending += len(entries)

    def _read(self, limit: int) -> list[Entry]:
        rows = self._conn().execute("SELECT seq, entry FROM journal ORDER BY seq LIMIT ?", (limit,))
        return [Entry.load(seq, blob) for seq, blob in rows]

    async def read(self, limit: int = 200) -> list[Entry]:
        return await self._run(self._read, limit)

    def _remove(self, seq: int) -> None:
        self._conn().execute("DELETE FROM journal WHERE seq = ?", (seq,))

    async def remove(self, entry: Entry) -> None:
        await self._run(self._remove, entry.seq)
        self.pending = max(0, self.pending - 1)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)
