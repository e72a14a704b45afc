"""Where the sqlite stores' group commits run (sidecar/stores/sqlite_thread.py): on the event
loop while the write lock is free at once, on the connection's thread when it is not; the
checkpointer that keeps the WAL from growing while no writer checkpoints; the usage records'
writes, in a group commit or, a backlog, whole on the thread."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.stores import sqlite_thread
from sidecar.stores.budget import Charge, Finished, RecordRef, Scope, UsageRecord, window
from sidecar.stores.budget_sqlite import FINISH_ROWS, SqliteBudgetStore
from sidecar.stores.sqlite_thread import ThreadedSqlite

SCHEMA = "CREATE TABLE IF NOT EXISTS item (k INTEGER PRIMARY KEY, v TEXT NOT NULL);"


class Items(ThreadedSqlite):
    def __init__(self, path: str, commit_on_loop: bool = True) -> None:
        super().__init__(path, "test-items", SCHEMA, "NORMAL", commit_on_loop=commit_on_loop)

    @staticmethod
    def _add(db: sqlite3.Connection, value: str) -> str:
        db.execute("INSERT INTO item (v) VALUES (?)", (value,))
        return threading.current_thread().name

    async def add(self, value: str) -> str:
        """The value added; returns the name of the thread that ran the insert."""
        ran_on: str = await self._enqueue(self._add, value)
        return ran_on

    def _count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM item").fetchone()[0])

    async def count(self) -> int:
        return await self._run(self._count)

    @staticmethod
    def _add_then_fail(db: sqlite3.Connection, value: str) -> None:
        db.execute("INSERT INTO item (v) VALUES (?)", (value,))
        raise LookupError(value)

    async def add_then_fail(self, value: str) -> None:
        await self._enqueue(self._add_then_fail, value)


def wal_pages(path: str) -> int:
    return os.path.getsize(path + "-wal") // 4096


@pytest.fixture
async def items(tmp_path: Path) -> AsyncIterator[Items]:
    opened = Items(str(tmp_path / "items.db"))
    await opened._run(opened._conn)
    yield opened
    await opened.close()


async def test_a_group_whose_write_lock_is_free_commits_on_the_event_loop(items: Items) -> None:
    ran_on = await asyncio.gather(*(items.add(str(n)) for n in range(5)))

    assert set(ran_on) == {threading.current_thread().name}
    assert await items.count() == 5


@pytest.mark.parametrize("on_loop", [True, False])
async def test_a_call_that_raises_in_a_group_is_undone_alone(tmp_path: Path, on_loop: bool) -> None:
    store = Items(str(tmp_path / "group.db"), commit_on_loop=on_loop)
    try:
        results = await asyncio.gather(
            store.add("first"), store.add_then_fail("middle"), store.add("last"),
            return_exceptions=True,
        )  # fmt: skip
        alone = await asyncio.gather(store.add_then_fail("alone"), return_exceptions=True)
        rows = await store._run(
            lambda: [v for (v,) in store._conn().execute("SELECT v FROM item ORDER BY k")]
        )
    finally:
        await store.close()

    assert isinstance(results[1], LookupError) and isinstance(alone[0], LookupError)
    assert rows == ["first", "last"]


async def test_a_group_that_would_wait_for_another_writer_waits_on_the_thread(
    items: Items,
) -> None:
    other = sqlite3.connect(items.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's writer, holding the lock
    other.execute("INSERT INTO item (v) VALUES ('other')")
    adding = asyncio.ensure_future(items.add("mine"))
    await asyncio.sleep(0.2)
    assert not adding.done()  # waiting for the lock, and the loop is free meanwhile

    other.execute("COMMIT")
    ran_on = await asyncio.wait_for(adding, 5)

    assert ran_on.startswith("test-items")
    assert await items.count() == 2
    assert await items.add("later") == threading.current_thread().name  # lock free again
    other.close()


async def test_a_store_at_synchronous_full_commits_on_its_thread(tmp_path: Path) -> None:
    journal_like = Items(str(tmp_path / "full.db"), commit_on_loop=False)
    try:
        assert (await journal_like.add("x")).startswith("test-items")
    finally:
        await journal_like.close()


async def test_the_writers_leave_checkpoints_to_the_checkpointer(items: Items) -> None:
    await items.add("x")

    def pages(db: sqlite3.Connection | None) -> int:
        assert db is not None
        return int(db.execute("PRAGMA wal_autocheckpoint").fetchone()[0])

    assert pages(items._loop_db) == 0
    assert await items._run(lambda: pages(items._db)) == 0


async def test_the_checkpointer_starts_the_wal_over_under_continuous_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_thread, "CHECKPOINT_SECONDS", 0.01)
    monkeypatch.setattr(sqlite_thread, "CHECKPOINT_RESTART_FRAMES", 64)
    store = Items(str(tmp_path / "busy.db"))
    try:
        for n in range(3000):  # ≈ 3000 frames: far past 64 without the checkpointer
            await store.add("v" * 200 + str(n))
            if n % 100 == 0:
                await asyncio.sleep(0.005)
        assert wal_pages(store.path) < 1000
        assert await store.count() == 3000
    finally:
        await store.close()


async def test_one_checkpointer_per_file_outlives_all_but_the_last_store(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    first, second = Items(path), Items(path)
    await first.add("a")
    await second.add("b")
    assert first._checkpointer is second._checkpointer is not None
    thread = first._checkpointer._thread

    await first.close()
    assert thread.is_alive()
    await second.close()
    assert not thread.is_alive()


async def finished_records(store: SqliteBudgetStore, count: int) -> list[Finished]:
    """`count` settled requests of customer c (a settle each, 5 nano-USD), their records
    finished with 2 nano-USD more."""
    scope = Scope("cust", "c", 10**12, "total")
    finished = []
    started = time.time()  # within the records' retention
    for n in range(count):
        holds = await store.reserve([(scope, window("total"))], 10, 60.0)
        record = RecordRef(f"r{n}", "c", started + n)
        await store.settle(holds, Charge(f"r{n}:1", 5, 1, 1), record)
        usage = UsageRecord(record.id, record.time, request_id=f"q{n}", customer="c", status=200)
        finished.append(Finished(usage, Charge(f"r{n}:final", 2, 0, 0)))
    return finished


@pytest.mark.parametrize("count", [1, FINISH_ROWS + 1])
async def test_usage_records_are_finished_whole_and_add_up_to_spent(
    tmp_path: Path, count: int
) -> None:
    store = SqliteBudgetStore(str(tmp_path / "budget.db"))
    await store.open()
    try:
        await store.write_usage(await finished_records(store, count))
        records = await store.usage("c", None, None)
        balance = await store.balance(Scope("cust", "c", 10**12, "total"), window("total"))
    finally:
        await store.close()

    assert [r.status for r in records] == [200] * count
    assert [r.cost for r in records] == [7] * count
    assert balance.spent == 5 * count  # the final charges were spent by no settle
