"""Budgets and usage records in an embedded sqlite file (the default backend).

Reserves and settles run in `BEGIN IMMEDIATE` transactions, those queued at the same time
sharing one (group commit, each in its own savepoint; on the event loop when the write lock is
free at once, else on the connection's thread: sidecar/stores/sqlite_thread.py), so a settle's
spent and the usage record's cost commit together (a `kill -9` leaves both or neither), and
several processes may share one file. WAL journal, `synchronous=NORMAL`: a committed
transaction survives the process dying; a power cut may lose those since the last checkpoint
(the checkpointer thread's, every 0.2 s under writes).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sidecar.ids import new_id
from sidecar.stores.budget import (
    AbandonedReserves,
    Balance,
    BudgetExceeded,
    Charge,
    Finished,
    Hold,
    RecordRef,
    Scope,
    Settled,
    StoreUnavailable,
    UsageRecord,
    Window,
    carries_record,
)
from sidecar.stores.sqlite_thread import ThreadedSqlite

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS budget_spent (
    scope TEXT NOT NULL, period TEXT NOT NULL, spent INTEGER NOT NULL,
    PRIMARY KEY (scope, period)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS budget_hold (
    id TEXT NOT NULL, scope TEXT NOT NULL, amount INTEGER NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (scope, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage_record (
    id TEXT PRIMARY KEY, time REAL NOT NULL, request_id TEXT, key_id TEXT, developer TEXT,
    customer TEXT, refs_tried TEXT, ref_used TEXT, status INTEGER,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost INTEGER NOT NULL DEFAULT 0, latency_ms REAL, fallback INTEGER, reprompts INTEGER
);
CREATE INDEX IF NOT EXISTS usage_record_customer_time ON usage_record (customer, time);
CREATE INDEX IF NOT EXISTS usage_record_time ON usage_record (time);
"""

_COLUMNS = (
    "id, time, request_id, key_id, developer, customer, refs_tried, ref_used, status, "
    "prompt_tokens, completion_tokens, cost, latency_ms, fallback, reprompts"
)
_DROP_HOLD = "DELETE FROM budget_hold WHERE scope = ? AND id = ?"
_BALANCE = (  # spent (NULL before the first settle of the period) and held, in one statement
    "SELECT (SELECT spent FROM budget_spent WHERE scope = ?1 AND period = ?2), "
    "(SELECT COALESCE(SUM(amount), 0) FROM budget_hold WHERE scope = ?1 AND expires > ?3)"
)
_ADD_SPENT = (  # RETURNING: sqlite >= 3.35
    "INSERT INTO budget_spent (scope, period, spent) VALUES (?, ?, ?) "
    "ON CONFLICT (scope, period) DO UPDATE SET spent = spent + excluded.spent RETURNING spent"
)
_ADD_CHARGE = (
    "INSERT INTO usage_record (id, time, customer, cost, prompt_tokens, completion_tokens) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET cost = cost + excluded.cost, "
    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = completion_tokens + excluded.completion_tokens"
)
_FINISH = (
    f"INSERT INTO usage_record ({_COLUMNS}) VALUES ({', '.join('?' * 15)}) "
    "ON CONFLICT (id) DO UPDATE SET request_id = excluded.request_id, "
    "key_id = excluded.key_id, developer = excluded.developer, customer = excluded.customer, "
    "refs_tried = excluded.refs_tried, ref_used = excluded.ref_used, status = excluded.status, "
    "latency_ms = excluded.latency_ms, fallback = excluded.fallback, "
    "reprompts = excluded.reprompts, cost = cost + excluded.cost, "
    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = completion_tokens + excluded.completion_tokens"
)
PRUNE_EVERY = 3600.0
SWEEP_SECONDS = 1.0  # how often a reserve deletes expired holds
FINISH_ROWS = 50  # usage records a group commit takes: about a millisecond of SQL at most


class SqliteBudgetStore(ThreadedSqlite):
    def __init__(
        self,
        path: str,
        retention_days: float = 90.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            path, "ringside-budget-db", SCHEMA, synchronous="NORMAL", commit_on_loop=True
        )
        self.retention = retention_days * 86400
        self.clock = clock
        self._pruned_at = 0.0
        self._next_sweep = 0.0
        self._abandoned = AbandonedReserves()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await super()._run(fn, *args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite {self.path}: {exc}") from exc

    async def open(self) -> None:
        await self._run(self._conn)

    # -- budgets ---------------------------------------------------------------------------
    @staticmethod
    def _balance(db: sqlite3.Connection, scope: str, period: str, now: float) -> Balance:
        spent, held = db.execute(_BALANCE, (scope, period, now)).fetchone()
        return Balance(spent or 0, held)

    def _reserve(
        self,
        db: sqlite3.Connection,
        scopes: Sequence[tuple[Scope, Window]],
        amount: int,
        ttl: float,
    ) -> list[Hold]:
        now = self.clock()
        if now >= self._next_sweep:  # expired holds count for nothing: their rows can wait
            self._next_sweep = now + SWEEP_SECONDS
            db.execute("DELETE FROM budget_hold WHERE expires <= ?", (now,))
        hold_id = new_id()
        holds = []
        for scope, win in scopes:
            balance = self._balance(db, scope.name, win.id, now)
            if balance.spent + balance.held + amount > scope.limit:
                raise BudgetExceeded(scope, win, balance, amount)
            holds.append(Hold(hold_id, scope, win, amount, balance.spent))
        for hold in holds:
            db.execute(
                "INSERT INTO budget_hold (id, scope, amount, expires) VALUES (?, ?, ?, ?)",
                (hold_id, hold.scope.name, amount, now + ttl),
            )
        return holds

    async def reserve(
        self, scopes: Sequence[tuple[Scope, Window]], amount: int, ttl: float
    ) -> list[Hold]:
        reserving = self._enqueue(self._reserve, scopes, amount, ttl)
        return await self._abandoned.reserve_or_release(reserving, self._release)

    def _release_holds(self, db: sqlite3.Connection, holds: Sequence[Hold]) -> None:
        for hold in holds:
            db.execute(_DROP_HOLD, (hold.scope.name, hold.id))

    async def _release(self, holds: Sequence[Hold]) -> None:
        with contextlib.suppress(StoreUnavailable):  # then it expires on its own
            await self._enqueue(self._release_holds, holds)

    def _settle(
        self, db: sqlite3.Connection, holds: Sequence[Hold], charge: Charge, record: RecordRef
    ) -> Settled:
        settled = Settled()
        for hold in holds:
            db.execute(_DROP_HOLD, (hold.scope.name, hold.id))
            (spent,) = db.execute(
                _ADD_SPENT, (hold.scope.name, hold.window.id, charge.cost)
            ).fetchone()
            settled.balances[hold.scope.name] = Balance(spent)
        if carries_record(holds, record):
            db.execute(
                _ADD_CHARGE,
                (
                    record.id,
                    record.time,
                    record.customer,
                    charge.cost,
                    charge.prompt_tokens,
                    charge.completion_tokens,
                ),
            )
        return settled

    async def settle(self, holds: Sequence[Hold], charge: Charge, record: RecordRef) -> Settled:
        # queued work runs even if this await is cancelled: the settle cannot be cut short
        result: Settled = await self._enqueue(self._settle, holds, charge, record)
        return result

    def _balance_now(self, scope: Scope, win: Window) -> Balance:
        return self._balance(self._conn(), scope.name, win.id, self.clock())

    async def balance(self, scope: Scope, win: Window) -> Balance:
        return await self._run(self._balance_now, scope, win)

    # -- usage records ---------------------------------------------------------------------
    @staticmethod
    def _finish(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        db.executemany(_FINISH, rows)

    def _prune(self, before: float) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM usage_record WHERE time < ?", (before,))

    def _finish_alone(self, rows: list[tuple[Any, ...]]) -> None:
        with self._transaction() as db:
            db.executemany(_FINISH, rows)

    async def write_usage(self, finished: Sequence[Finished]) -> None:
        """All or none of the batch (a retry must not add a charge twice): in a group commit,
        which may run on the event loop (sqlite_thread), or, a batch of more than FINISH_ROWS
        (a backlog), in a transaction of its own on the thread. The hourly prune on the thread."""
        rows = [_row(item) for item in finished]
        if len(rows) > FINISH_ROWS:
            await self._run(self._finish_alone, rows)
        elif rows:
            await self._enqueue(self._finish, rows, later=True)
        now = self.clock()
        if finished and now - self._pruned_at > PRUNE_EVERY:
            self._pruned_at = now
            await self._run(self._prune, now - self.retention)

    def _usage(
        self, customer: str | None, since: float | None, until: float | None
    ) -> list[UsageRecord]:
        where = ["time >= ?", "time < ?"]
        args: list[Any] = [since or 0.0, until or float("inf")]
        if customer is not None:
            where.append("customer = ?")
            args.append(customer)
        rows = self._conn().execute(
            f"SELECT {_COLUMNS} FROM usage_record WHERE {' AND '.join(where)} ORDER BY time, id",
            args,
        )
        return [_record(row) for row in rows]

    async def usage(
        self, customer: str | None, since: float | None, until: float | None
    ) -> list[UsageRecord]:
        return await self._run(self._usage, customer, since, until)


def _row(item: Finished) -> tuple[Any, ...]:
    r, charge = item.record, item.charge
    return (
        r.id, r.time, r.request_id, r.key_id, r.developer, r.customer, ",".join(r.refs_tried),
        r.ref_used, r.status, charge.prompt_tokens, charge.completion_tokens, charge.cost,
        r.latency_ms, int(r.fallback), r.reprompts,
    )  # fmt: skip


def _record(row: Sequence[Any]) -> UsageRecord:
    return UsageRecord(
        id=row[0],
        time=row[1],
        request_id=row[2] or "",
        key_id=row[3],
        developer=row[4],
        customer=row[5],
        refs_tried=tuple(row[6].split(",")) if row[6] else (),
        ref_used=row[7],
        status=row[8],
        prompt_tokens=row[9],
        completion_tokens=row[10],
        cost=row[11],
        latency_ms=row[12],
        fallback=bool(row[13]),
        reprompts=row[14] or 0,
    )
