"""A local outbox for the redis budget store: writes that could not reach redis wait here.

Each entry is one guarded Lua call (script name, keys, args) plus the money it moves, so that
a replay re-issues exactly the write that failed. The scripts apply an op id at most once, so
an entry replayed twice (redis applied it, then the sidecar died before deleting it here) is
not counted twice. A sqlite file, `synchronous=FULL`: an appended entry survives `kill -9`.
Appends made at the same time (every request that met the outage) share one transaction.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from sidecar.stores.sqlite_thread import ThreadedSqlite


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


JOURNAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY AUTOINCREMENT, entry BLOB NOT NULL);
"""


class Journal(ThreadedSqlite):
    def __init__(self, path: str) -> None:
        super().__init__(path, "ringside-journal", JOURNAL_SCHEMA, synchronous="FULL")
        self.pending = 0

    def _open(self) -> list[Entry]:
        if not os.path.exists(self.path):
            return []
        return self._read(1_000_000)

    async def open(self) -> list[Entry]:
        """Entries left by an earlier run (an existing file is read; none is created)."""
        entries = await self._run(self._open)
        self.pending = len(entries)
        return entries

    @staticmethod
    def _append(db: sqlite3.Connection, entries: Sequence[Entry]) -> None:
        db.executemany("INSERT INTO journal (entry) VALUES (?)", [(e.dump(),) for e in entries])

    async def append(self, entries: Sequence[Entry]) -> None:
        """Durable once this returns; raises StoreUnavailable when the file cannot take them."""
        await self._enqueue(self._append, entries)
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
