"""Budgets and usage records in an embedded sqlite file (the default backend).

Reserves and settles run in `BEGIN IMMEDIATE` transactions, those queued at the same time
sharing one (group commit, each in its own savepoint; on the event loop when the write lock is
free at once, else on the connection's thread: sidecar/stores/sqlite_thread.py), so a settle's
spent and the usage record's cost commit together (a `kill -9` leaves both or neither), and
several processes may share one file. WAL journal, `synchronous=NORMAL`: a committed
transaction survives the process dying; a power cut may lose those since the last checkpoint
(the checkpointer thread's, every 0.2 s under writes).

Leases (`leases=True`, storage.budget_leases; budget_lease has the accounting): a process
holds a slice of a (scope, period) budget as one row of budget_hold (an id starting with L,
expiring with the reservation TTL unless renewed) and admits requests on it in memory with
no transaction (`reserve_now`). A leased request's settle is one group-commit call: spent +=
cost, the usage record += cost, the lease's row -= what the lease gives up for it
(`settle_now`), committed before the answer leaves (its `wait`). Every lease call goes
through this store's one ordered queue, so the file applies a lease's settles before it grows,
trims or gives it back. Other processes (workers sharing the file) count a lease's row as
held, like any hold; a crashed process's lease expires with its TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from functools import partial
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
from sidecar.stores.budget_lease import (
    LEAN_SECONDS,
    RENEW_FRACTION,
    SHARE,
    Lease,
    LeaseBook,
    margin,
)
from sidecar.stores.sqlite_thread import ThreadedSqlite

log = logging.getLogger("ringside")

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
_FINISH = (  # no `customer` in the update: a settle wrote the same one (RecordRef's), and an
    # indexed column left out of SET spares the update its index (customer, time)
    f"INSERT INTO usage_record ({_COLUMNS}) VALUES ({', '.join('?' * 15)}) "
    "ON CONFLICT (id) DO UPDATE SET request_id = excluded.request_id, "
    "key_id = excluded.key_id, developer = excluded.developer, "
    "refs_tried = excluded.refs_tried, ref_used = excluded.ref_used, status = excluded.status, "
    "latency_ms = excluded.latency_ms, fallback = excluded.fallback, "
    "reprompts = excluded.reprompts, cost = cost + excluded.cost, "
    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = completion_tokens + excluded.completion_tokens"
)
PRUNE_EVERY = 3600.0
SWEEP_SECONDS = 1.0  # how often a reserve deletes expired holds
FINISH_ROWS = 50  # usage records a group commit takes: about a millisecond of SQL at most
TEND_SECONDS = 0.5  # how often leases are looked at (renewed, given back when idle)
GROW_TRIES = 3  # a request whose lease room was taken by others grows it again this often
_LEASED = (  # what leases hold (their ids start with L; per-request hold ids are hex)
    "SELECT COALESCE(SUM(amount), 0) FROM budget_hold "
    "WHERE scope = ? AND expires > ? AND id >= 'L' AND id < 'M'"
)
_LEASE_ROW = "SELECT expires FROM budget_hold WHERE scope = ? AND id = ?"
_LEASE_TAKE = "UPDATE budget_hold SET amount = amount - ? WHERE scope = ? AND id = ?"


class SqliteBudgetStore(ThreadedSqlite):
    def __init__(
        self,
        path: str,
        retention_days: float = 90.0,
        clock: Callable[[], float] = time.time,
        leases: bool = False,
        lease_slice: int = 16,
        lease_idle: float = 2.0,
        ttl: float = 600.0,
    ) -> None:
        super().__init__(
            path, "ringside-budget-db", SCHEMA, synchronous="NORMAL", commit_on_loop=True
        )
        self.retention = retention_days * 86400
        self.clock = clock
        self._pruned_at = 0.0
        self._next_sweep = 0.0
        self._abandoned = AbandonedReserves()
        # leases (module docstring)
        self.leasing = leases
        self.lease_idle = lease_idle
        self.book = LeaseBook(ttl, lease_slice)
        self._retired: list[Lease] = []  # out of use; given back once their requests settle
        self._tender: asyncio.Task[None] | None = None
        self._closing = False
        self._known: dict[tuple[str, str], int] = {}  # spent as the file last said it
        self._pending: dict[tuple[str, str], int] = {}  # lease settles queued, not committed
        self._settles: dict[tuple[str, ...], _LeaseSettles] = {}  # by lease ids, not flushed

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await super()._run(fn, *args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite {self.path}: {exc}") from exc

    async def open(self) -> None:
        await self._run(self._conn)
        if self.leasing:
            self._tender = asyncio.create_task(self._tend_loop())

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
                (balance.leased,) = db.execute(_LEASED, (scope.name, now)).fetchone()
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
        reserving: asyncio.Future[list[Hold]]
        if self.leasing:  # a task: a cancelled caller's grow goes on, its holds are released
            reserving = asyncio.ensure_future(self._reserve_leased(list(scopes), amount, ttl))
        else:
            reserving = self._enqueue(self._reserve, scopes, amount, ttl)
        return await self._abandoned.reserve_or_release(reserving, self._release)

    def _release_holds(self, db: sqlite3.Connection, holds: Sequence[Hold]) -> None:
        for hold in holds:
            db.execute(_DROP_HOLD, (hold.scope.name, hold.id))

    async def _release(self, holds: Sequence[Hold]) -> None:
        alone = []
        for hold in holds:
            if hold.lease is not None:  # admitted on a lease: its room is the lease's again
                LeaseBook.unadmit(hold)
            else:
                alone.append(hold)
        if alone:
            with contextlib.suppress(StoreUnavailable):  # then it expires on its own
                await self._enqueue(self._release_holds, alone)

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
        if holds and holds[0].lease is not None:  # admitted on leases (all or nothing)
            leased = self.settle_now(holds, charge, record)
            if leased is not None:
                if leased.wait is not None:
                    await leased.wait
                return leased
        # queued work runs even if this await is cancelled: the settle cannot be cut short
        result: Settled = await self._enqueue(self._settle, holds, charge, record)
        return result

    def _balance_now(self, scope: Scope, win: Window) -> Balance:
        db, now = self._conn(), self.clock()
        balance = self._balance(db, scope.name, win.id, now)
        (balance.leased,) = db.execute(_LEASED, (scope.name, now)).fetchone()
        return balance

    async def balance(self, scope: Scope, win: Window) -> Balance:
        return await self._run(self._balance_now, scope, win)

    # -- leases (module docstring; budget_lease) -------------------------------------------
    def reserve_now(
        self, scopes: Sequence[tuple[Scope, Window]], amount: int, ttl: float
    ) -> list[Hold] | None:
        """Admitted on this process's leases, with no transaction; None when a lease lacks
        room (or leasing is off): then `reserve`."""
        if not self.leasing:
            return None
        holds = self.book.admit(scopes, amount)  # type: ignore[arg-type]
        if holds is not None:
            for hold in holds:
                hold.spent = self._spent_now((hold.scope.name, hold.window.id))
        return holds

    def _spent_now(self, key: tuple[str, str]) -> int:
        """Spent as this process knows it: the file's last answer plus the settles queued."""
        return self._known.get(key, 0) + self._pending.get(key, 0)

    async def _reserve_leased(
        self, windows: list[tuple[Scope, Window]], amount: int, ttl: float
    ) -> list[Hold]:
        """Room on the leases (grown with one transaction), else per-request holds."""
        book = self.book
        book.ttl = ttl
        book.wait(windows, amount, 1)  # a grow asks for room for every request waiting
        try:
            for _ in range(GROW_TRIES):
                holds = self.reserve_now(windows, amount, ttl)
                if holds is not None:
                    return holds
                now = time.monotonic()
                if self._closing or any(book.is_lean((s.name, w.id), now) for s, w in windows):
                    break
                grows = (self._grow(s, w, amount, ttl) for s, w in windows)
                if not all(await asyncio.gather(*grows)):
                    break
        finally:
            book.wait(windows, amount, -1)
        alone: list[Hold] = await self._enqueue(self._reserve, windows, amount, ttl)
        return alone

    async def _grow(self, scope: Scope, win: Window, amount: int, ttl: float) -> bool:
        """Room for `amount` on the scope's lease (a new lease, or a bigger one); False when
        the file has too little free to slice (the scope is lean for a moment) or fails."""
        key = (scope.name, win.id)
        book = self.book
        lease = book.leases.get(key)
        now = time.monotonic()
        if lease is not None and (
            lease.ended
            or (lease.created and lease.deadline <= now)
            or lease.scope.limit != scope.limit  # a reload changed the limit: a new lease
        ):
            self._retire(key, lease)
            lease = None
        if lease is None:
            lease = book.leases[key] = Lease(scope, win)
        elif lease.free >= amount:
            return True
        growing = lease.growing
        if growing is None:
            most, least = book.want(lease, amount)
            growing = lease.growing = self._enqueue(
                self._lease_grow, scope, win, lease.id, most, least, ttl, not lease.created
            )
            growing.add_done_callback(partial(self._grown, lease, now, ttl, True))
        try:
            grant = await asyncio.shield(growing)
        except StoreUnavailable:
            return False
        return bool(grant[0])

    def _lease_grow(
        self,
        db: sqlite3.Connection,
        scope: Scope,
        win: Window,
        lease_id: str,
        most: int,
        least: int,
        ttl: float,
        create: bool,
    ) -> tuple[int, int, bool]:
        """Grant up to `most` (at least `least`, else nothing) and renew: (grant, spent, live).
        A lease whose row expired is not live: what it held is free again. Renewal: most 0."""
        now = self.clock()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_SECONDS
            db.execute("DELETE FROM budget_hold WHERE expires <= ?", (now,))
        row = db.execute(_LEASE_ROW, (scope.name, lease_id)).fetchone()
        balance = self._balance(db, scope.name, win.id, now)
        if not create and (row is None or row[0] <= now):  # expired (a stalled process)
            return 0, balance.spent, False
        grant = min(most, (scope.limit - balance.spent - balance.held) // SHARE)
        if grant < max(least, 1):
            grant = 0
        if row is None:
            if grant:
                db.execute(
                    "INSERT INTO budget_hold (id, scope, amount, expires) VALUES (?, ?, ?, ?)",
                    (lease_id, scope.name, grant, now + ttl),
                )
        else:
            db.execute(
                "UPDATE budget_hold SET amount = amount + ?, expires = ? "
                "WHERE scope = ? AND id = ?",
                (grant, now + ttl, scope.name, lease_id),
            )
        return grant, balance.spent, True

    def _grown(
        self, lease: Lease, sent: float, ttl: float, asked: bool, done: asyncio.Future[Any]
    ) -> None:
        """A grow's or renewal's outcome, applied before any of its waiters runs."""
        lease.growing = None
        if done.cancelled() or done.exception() is not None:
            if not done.cancelled():
                log.error("a budget lease call failed in sqlite: %s", done.exception())
            return
        grant, spent, live = done.result()
        key = (lease.scope.name, lease.window.id)
        self._known[key] = spent
        if not live:
            lease.ended = True  # expired in the file: what it held is free again
        elif grant or lease.created:
            lease.created = True
            lease.renewed = sent
            lease.deadline = sent + ttl - margin(ttl)
            lease.amount += grant
            if grant:
                lease.used = time.monotonic()  # not idle before its waiters are admitted
        if asked and not grant and live:
            self.book.lean[key] = time.monotonic() + LEAN_SECONDS
            if lease.created and lease.free > 0:  # near the limit: give back what is unused
                cut = lease.free
                lease.amount -= cut
                self._lease_write(self._lease_take, lease, cut)

    @staticmethod
    def _lease_take(db: sqlite3.Connection, scope: str, lease_id: str, cut: int) -> None:
        db.execute(_LEASE_TAKE, (cut, scope, lease_id))

    @staticmethod
    def _lease_return(db: sqlite3.Connection, scope: str, lease_id: str, _: int) -> None:
        db.execute(_DROP_HOLD, (scope, lease_id))

    def _lease_write(self, fn: Callable[..., None], lease: Lease, amount: int) -> None:
        """A trim or give-back, queued in order behind the lease's settles; a failure leaves
        the file holding more than this process uses (it expires with the TTL)."""
        queued = self._enqueue(fn, lease.scope.name, lease.id, amount)
        queued.add_done_callback(_log_failure)

    def _renew(self, lease: Lease) -> None:
        ttl = self.book.ttl
        lease.renewed = now = time.monotonic()
        renewing = lease.growing = self._enqueue(
            self._lease_grow, lease.scope, lease.window, lease.id, 0, 0, ttl, False
        )
        renewing.add_done_callback(partial(self._grown, lease, now, ttl, False))

    def settle_now(
        self, holds: Sequence[Hold], charge: Charge, record: RecordRef
    ) -> Settled | None:
        """The settle of a request admitted on leases: accounted here and queued as one
        group-commit call; `wait` is done once it is committed (the answer waits for it).
        None for any other request (then `settle`)."""
        for hold in holds:
            if hold.lease is None:
                return None
        takes = [LeaseBook.settle(hold, charge.cost) for hold in holds]
        settled = Settled()
        cost = charge.cost
        if not (cost or charge.prompt_tokens or charge.completion_tokens):
            for hold in holds:  # nothing moves (an attempt failed before any usage)
                settled.balances[hold.scope.name] = Balance(
                    self._spent_now((hold.scope.name, hold.window.id))
                )
            return settled
        pending = self._pending
        for hold in holds:
            key = (hold.scope.name, hold.window.id)
            pending[key] = pending.get(key, 0) + cost
            settled.balances[hold.scope.name] = Balance(self._spent_now(key))
        # settles of requests on the same leases queued for the same group share one call
        lease_ids = tuple(hold.id for hold in holds)
        batch = self._settles.get(lease_ids)
        if batch is None or batch.queue is not self._queue:
            batch = self._settles[lease_ids] = _LeaseSettles(holds, self._queue)
            queued = self._enqueue(self._settle_leases, batch)
            queued.add_done_callback(partial(self._leases_settled, lease_ids, batch))
        batch.cost += cost
        batch_takes = batch.takes
        for i, take in enumerate(takes):
            batch_takes[i] += take
        if carries_record(holds, record):
            batch.records.append(
                (record.id, record.time, record.customer, cost, charge.prompt_tokens,
                 charge.completion_tokens)
            )  # fmt: skip
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch.answers.append(answer)
        settled.wait = answer
        return settled

    @staticmethod
    def _settle_leases(db: sqlite3.Connection, batch: _LeaseSettles) -> list[int]:
        """For the requests of one turn on the same leases: spent += their costs, each
        lease's row -= their takes, each record += its cost. Pure SQL (it may run twice)."""
        spents = []
        for hold, take in zip(batch.holds, batch.takes, strict=True):
            if take:
                db.execute(_LEASE_TAKE, (take, hold.scope.name, hold.id))
            (spent,) = db.execute(
                _ADD_SPENT, (hold.scope.name, hold.window.id, batch.cost)
            ).fetchone()
            spents.append(spent)
        records = batch.records
        if len(records) == 1:
            db.execute(_ADD_CHARGE, records[0])
        elif records:
            db.executemany(_ADD_CHARGE, records)
        return spents

    def _leases_settled(
        self, lease_ids: tuple[str, ...], batch: _LeaseSettles, done: asyncio.Future[Any]
    ) -> None:
        if self._settles.get(lease_ids) is batch:
            del self._settles[lease_ids]
        pending, known = self._pending, self._known
        error = None if done.cancelled() else done.exception()
        for i, hold in enumerate(batch.holds):
            key = (hold.scope.name, hold.window.id)
            left = pending[key] - batch.cost
            if left:
                pending[key] = left
            else:
                del pending[key]
            if error is None and not done.cancelled():
                known[key] = done.result()[i]
        if error is not None:
            log.error("settling budget lease requests failed in sqlite: %s", error)
        for answer in batch.answers:
            if not answer.done():
                answer.set_result(None)

    async def _tend_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(min(TEND_SECONDS, self.book.ttl / 8))
            try:
                self._tend()
            except Exception:
                log.exception("tending the budget leases failed; will retry")

    def _tend(self) -> None:
        """Renew leases in use, give back idle ones and those past their deadline."""
        now = time.monotonic()
        ttl = self.book.ttl
        for key, lease in list(self.book.leases.items()):
            if lease.growing is not None:
                continue
            idle = not lease.in_flight and now - lease.used >= self.lease_idle
            if idle or lease.ended or lease.deadline <= now:
                self._retire(key, lease)
            elif now - lease.renewed >= ttl / RENEW_FRACTION:
                self._renew(lease)
        if self._retired:
            self._give_back()

    def _retire(self, key: tuple[str, str], lease: Lease) -> None:
        lease.ended = True
        if self.book.leases.get(key) is lease:
            del self.book.leases[key]
        self._retired.append(lease)
        self._give_back()

    def _give_back(self) -> None:
        """Give back retired leases whose requests have all settled (their settles are
        queued before the give-back, so the file applies them first)."""
        keep: list[Lease] = []
        now = time.monotonic()
        for lease in self._retired:
            if lease.in_flight or lease.growing is not None:
                # kept until its requests settle, or until the file has surely expired it
                if now < lease.deadline + 2 * margin(self.book.ttl):
                    keep.append(lease)
                continue
            if lease.created:
                lease.amount = lease.reserved = 0
                self._lease_write(self._lease_return, lease, 0)
        self._retired = keep

    async def close(self) -> None:
        """Every lease's rest goes back to the budget (queued before the close's flush)."""
        self._closing = True
        if self._tender is not None:
            self._tender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tender
        for key, lease in list(self.book.leases.items()):
            self._retire(key, lease)
        self._give_back()  # (a request still in flight after the drain: its lease expires)
        await super().close()

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


class _LeaseSettles:
    """The settles of requests on the same leases queued for the same group commit (`queue`:
    the store's queue they joined; a flushed queue is replaced, and later settles start a
    new batch): one call does them all, each answer waits for its commit."""

    __slots__ = ("answers", "cost", "holds", "queue", "records", "takes")

    def __init__(self, holds: Sequence[Hold], queue: list[Any]) -> None:
        self.holds = holds  # the first request's: every request's scopes, windows, lease ids
        self.queue = queue
        self.takes = [0] * len(holds)
        self.cost = 0
        self.records: list[tuple[Any, ...]] = []
        self.answers: list[asyncio.Future[None]] = []


def _log_failure(done: asyncio.Future[Any]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("a budget lease write failed in sqlite: %s", done.exception())


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
