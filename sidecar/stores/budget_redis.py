"""Budgets and usage records in redis, shared by every sidecar that points at it.

Keys are Cluster-safe: everything of one customer lives under the hash tag `{cust:<id>}` (its
spent per period, its holds, its usage records and their index), everything of one API key's
budget under `{key:<id>}`, so each Lua script touches one slot. Requests without a customer
keep their records under `{nocust}`. The scripts are registered once and run by SHA.

Every script that adds money is guarded by an op id (an `HSETNX` on the usage record, or on a
per-day op hash for key budgets), so a write replayed from the local journal after an outage
is applied at most once. When redis is unreachable a settle or a usage write is journaled (see
budget_journal) and replayed when redis answers again; a reserve fails with StoreUnavailable,
unless `fail_open`, in which case the sidecar admits against its last known spent plus what it
journaled since (a best effort: other sidecars' spend during the outage is not seen).

A reserve that fails may still have run, or may run later (a reply lost to a timeout, a server
frozen with the call in its socket buffers): its release is journaled too, and leaves a
tombstone that a late copy of the reserve finds (budget_lua), so the hold never waits for its
TTL. While redis fails, one reserve per PROBE_SECONDS tries it and the others fail at once:
an outage costs neither every request a timeout nor every request a journaled release.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import redis.exceptions
from redis.asyncio import Redis

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
from sidecar.stores.budget_journal import Entry, Journal
from sidecar.stores.budget_lease import (
    LEAN_SECONDS,
    RENEW_FRACTION,
    SHARE,
    Lease,
    LeaseBook,
    margin,
)
from sidecar.stores.budget_line import ScriptLine
from sidecar.stores.budget_lua import (
    FINISH,
    INDEX,
    LEASE,
    LEASE_RETURN,
    LEASE_SETTLE,
    RELEASE,
    RESERVE,
    SETTLE,
)
from sidecar.stores.redis_batch import ScriptBatcher
from sidecar.stores.redis_pool import COMMAND_TIMEOUT

log = logging.getLogger("ringside")

UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
CUSTOMERS = "rs:usage:customers"  # every record tag that has records (for exports)
SPENT_GRACE = 7 * 86400  # a period's spent counter outlives the period by this much
OP_GUARD_TTL = 3 * 86400
PROBE_SECONDS = 0.25
INDEX_REFRESH_SECONDS = 60.0  # a record tag is re-added to CUSTOMERS at most this often
TEND_SECONDS = 0.5  # how often leases are looked at (renewed, given back when idle)
GROW_TRIES = 3  # a request whose lease room was taken by others grows it again this often


def record_tag(customer: str | None) -> str:
    return "nocust" if customer is None else f"cust:{customer}"


def _record_keys(customer: str | None, usage_id: str) -> list[str]:
    tag = record_tag(customer)
    return [f"rs:{{{tag}}}:usage:r:{usage_id}", f"rs:{{{tag}}}:usage:idx"]


def _scope_keys(scope: Scope, win: Window) -> list[str]:
    base = f"rs:{{{scope.name}}}:budget:"
    return [base + "spent:" + win.id, base + "held", base + "holds", base + "hold_amount"]


def _release_entry(hold: Hold) -> Entry:
    return Entry("release", _scope_keys(hold.scope, hold.window), [hold.id])


class RedisBudgetStore:
    def __init__(
        self,
        client: Redis,
        journal_path: str,
        fail_open: bool = False,
        retention_days: float = 90.0,
        replay_interval: float = 0.5,
        probe_interval: float = PROBE_SECONDS,
        leases: bool = False,
        lease_slice: int = 16,
        lease_idle: float = 2.0,
        ttl: float = 600.0,
    ) -> None:
        self.client = client  # closed by close(); its pool too if it owns it (redis_pool)
        self.scripts = {
            "reserve": self.client.register_script(RESERVE),
            "release": self.client.register_script(RELEASE),
            "settle": self.client.register_script(SETTLE),
            "finish": self.client.register_script(FINISH),
            "index": self.client.register_script(INDEX),
            "lease": self.client.register_script(LEASE),
            "lease_settle": self.client.register_script(LEASE_SETTLE),
            "lease_return": self.client.register_script(LEASE_RETURN),
        }
        self.batcher = ScriptBatcher(self.client, self.scripts)
        # leases (budget_lease): every call of a lease on one ordered connection
        self.leasing = leases
        self.lease_idle = lease_idle
        self.book = LeaseBook(ttl, lease_slice)
        self.line = ScriptLine(self.client, self.scripts, COMMAND_TIMEOUT)
        self._retired: list[Lease] = []  # out of use; given back once their requests settle
        self._tender: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Future[Any]] = set()  # journaling of failed lease writes
        self._unanswered: dict[tuple[str, str], int] = {}  # spent written on the line, unanswered
        self.journal = Journal(journal_path)
        self.fail_open = fail_open
        self.retention = int(retention_days * 86400)
        self.replay_interval = replay_interval
        self.probe_interval = probe_interval  # while redis fails: one reserve tries it per this
        self._known: dict[tuple[str, str], int] = {}  # spent as redis last reported it
        self._journaled: dict[tuple[str, str], int] = {}  # spent waiting in the journal
        self._local_holds: dict[str, dict[str, int]] = {}  # fail-open holds: scope → id → nano
        self._down_until = 0.0  # after a failed call: reserves fail at once until then
        self._down_error = ""
        self._replayer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._abandoned = AbandonedReserves()
        self._indexed: dict[str, float] = {}  # record tag → when it was last sent to CUSTOMERS

    async def open(self) -> None:
        for entry in await self.journal.open():
            self._note(entry, 1)
        if self.journal.pending:
            log.warning("replaying %d budget writes journaled while redis was down",
                        self.journal.pending)  # fmt: skip
        self._replayer = asyncio.create_task(self._replay_loop())
        if self.leasing:
            self._tender = asyncio.create_task(self._tend_loop())

    async def _call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            result = await self.batcher.call(name, keys, args)
        except UNREACHABLE as exc:
            self._down_until = time.monotonic() + self.probe_interval
            self._down_error = f"redis is unreachable: {exc}"
            raise StoreUnavailable(self._down_error) from exc
        if self._down_until:
            self._down_until = 0.0
        return result

    def _may_try(self) -> bool:
        """Whether a reserve may call redis now that a call failed: one per probe_interval."""
        now = time.monotonic()
        if now < self._down_until:
            return False
        self._down_until = now + self.probe_interval
        return True

    # -- budgets ---------------------------------------------------------------------------
    async def reserve(
        self, scopes: Sequence[tuple[Scope, Window]], amount: int, ttl: float
    ) -> list[Hold]:
        # a task: the round trips of a cancelled caller go on, and what they hold is released
        if self.leasing:
            reserving = asyncio.ensure_future(self._reserve_leased(scopes, amount, ttl))
        else:
            reserving = asyncio.ensure_future(self._reserve(scopes, amount, ttl))
        return await self._abandoned.reserve_or_release(reserving, self._release)

    def reserve_now(
        self, scopes: Sequence[tuple[Scope, Window]], amount: int, ttl: float
    ) -> list[Hold] | None:
        """Admitted on this process's leases, with no round trip; None when a lease lacks
        room (or leasing is off, or its line is down): then `reserve`."""
        if not self.leasing or self.line.writer is None:
            return None
        holds = self.book.admit(scopes, amount)  # type: ignore[arg-type]
        if holds is not None:
            for hold in holds:
                hold.spent = self._spent_now((hold.scope.name, hold.window.id))
        return holds

    def _spent_now(self, key: tuple[str, str]) -> int:
        """Spent as this process knows it: redis's last answer, plus the settles written since
        (not answered yet) and those waiting in the journal."""
        return self._known.get(key, 0) + self._unanswered.get(key, 0) + self._journaled.get(key, 0)

    # -- leases (budget_lease) -------------------------------------------------------------
    async def _reserve_leased(
        self, scopes: Sequence[tuple[Scope, Window]], amount: int, ttl: float
    ) -> list[Hold]:
        """Room on the leases (grown with one awaited call), else per-request holds."""
        book = self.book
        book.ttl = ttl
        windows = list(scopes)
        book.wait(windows, amount, 1)  # a grow asks for room for every request waiting
        try:
            for _ in range(GROW_TRIES):
                if self._down_until or not await self._line_up():
                    break
                holds = book.admit(windows, amount)
                if holds is not None:
                    for hold in holds:
                        hold.spent = self._spent_now((hold.scope.name, hold.window.id))
                    return holds
                now = time.monotonic()
                if any(book.is_lean((s.name, w.id), now) for s, w in windows):
                    break
                grows = (self._grow(s, w, amount, ttl) for s, w in windows)
                if not all(await asyncio.gather(*grows)):
                    break
        finally:
            book.wait(windows, amount, -1)
        try:
            return await self._reserve(windows, amount, ttl)
        except BudgetExceeded as exc:
            with contextlib.suppress(StoreUnavailable):  # the refusal says what leases hold
                exc.balance.leased = min((await self.balance(exc.scope, exc.window)).leased,
                                         exc.balance.held)  # fmt: skip
            raise

    async def _line_up(self) -> bool:
        if self.line.writer is not None:
            return True
        try:
            await self.line.connect()
        except UNREACHABLE as exc:
            self._down_until = time.monotonic() + self.probe_interval
            self._down_error = f"redis is unreachable: {exc}"
            return False
        return True

    async def _grow(self, scope: Scope, win: Window, amount: int, ttl: float) -> bool:
        """Room for `amount` on the scope's lease (a new lease, or a bigger one); False when
        redis has too little free to slice (the scope is lean for a moment) or fails."""
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
            waiting = self._journaled.get(key, 0)
            args = [scope.limit - waiting, most, least, SHARE, lease.id, int(ttl * 1000), 0,
                    "0" if lease.created else "1"]  # fmt: skip
            growing = lease.growing = self.line.send("lease", _scope_keys(scope, win), args)
            growing.add_done_callback(partial(self._grown, lease, now, ttl, True))
        try:
            grant = await asyncio.shield(growing)
        except UNREACHABLE:
            return False
        return bool(grant)

    def _grown(
        self, lease: Lease, sent: float, ttl: float, asked: bool, done: asyncio.Future[Any]
    ) -> None:
        """A lease call's reply, applied as it is read (before any waiter runs)."""
        lease.growing = None
        error = done.exception()
        if error is not None:
            self._line_failed(error)
            return
        grant, spent, _held, live = (int(n) for n in done.result())
        self._known[(lease.scope.name, lease.window.id)] = spent
        existed = lease.created
        if live:
            lease.created = True
            lease.renewed = sent
            lease.deadline = sent + ttl - margin(ttl)
            lease.amount += grant
            if grant:
                lease.used = time.monotonic()  # not idle before its waiters are admitted
        else:
            lease.ended = True  # expired in redis: what it held is free again
        if asked and not grant and (live or not existed):  # (not a lease that expired)
            key = (lease.scope.name, lease.window.id)
            self.book.lean[key] = time.monotonic() + LEAN_SECONDS
            if live and lease.free > 0:  # near the limit: give back what no request uses
                self._trim(lease)

    def _trim(self, lease: Lease) -> None:
        cut = lease.free
        lease.amount -= cut
        args = [0, 0, 0, SHARE, lease.id, int(self.book.ttl * 1000), cut, "0"]
        sent = self.line.send("lease", _scope_keys(lease.scope, lease.window), args)
        sent.add_done_callback(self._line_reply)

    def _renew(self, lease: Lease) -> None:
        ttl = self.book.ttl
        args = [0, 0, 0, SHARE, lease.id, int(ttl * 1000), 0, "0"]
        lease.renewed = now = time.monotonic()
        renewing = lease.growing = self.line.send(
            "lease", _scope_keys(lease.scope, lease.window), args
        )
        renewing.add_done_callback(partial(self._grown, lease, now, ttl, False))

    def _line_reply(self, done: asyncio.Future[Any]) -> None:
        error = done.exception()
        if error is not None:
            self._line_failed(error)

    def _line_failed(self, error: BaseException) -> None:
        """A lease call failed. A connection failure ends every lease: what redis did with
        the calls left unanswered is not known, so each is given back (with a tombstone)
        once its requests have settled, and its settles are journaled."""
        if not isinstance(error, UNREACHABLE):
            log.error("a budget lease call failed in redis: %s", error)
            return
        # the next reserve opens the line again (redis may only have closed an idle
        # connection); if that fails, reserves wait for the probe as after any failed call
        for key, lease in list(self.book.leases.items()):
            self._retire(key, lease)

    def _retire(self, key: tuple[str, str], lease: Lease) -> None:
        lease.ended = True
        if self.book.leases.get(key) is lease:
            del self.book.leases[key]
        self._retired.append(lease)
        self._give_back()

    def _give_back(self) -> None:
        """Give back retired leases whose requests have all settled."""
        keep: list[Lease] = []
        now = time.monotonic()
        for lease in self._retired:
            if lease.in_flight or lease.growing is not None:
                # kept until its requests settle, or until redis has surely expired it (a
                # hold never settled: nothing left to give back)
                if now < lease.deadline + 2 * margin(self.book.ttl):
                    keep.append(lease)
                continue
            lease.amount = lease.reserved = 0
            entry = Entry("lease_return", _scope_keys(lease.scope, lease.window),
                          [lease.id, int(self.book.ttl * 1000)])  # fmt: skip
            self._send_or_journal(entry)
        self._retired = keep

    def _send_or_journal(self, entry: Entry) -> None:
        """Write a lease's call on the line now; journaled if the line fails it."""
        sent = self.line.send(entry.script, entry.keys, entry.args)
        sent.add_done_callback(partial(self._written, entry))

    def _written(self, entry: Entry, done: asyncio.Future[Any]) -> None:
        error = done.exception()
        if entry.script == "lease_settle":
            scope, period, cost = entry.moves[0]
            key = (scope, period)
            self._unanswered[key] -= cost
            if error is None:
                self._known[key] = int(done.result()[1])
        if error is None:
            return
        if not isinstance(error, UNREACHABLE):
            log.error("a budget lease write failed in redis: %s (%s)", error, entry.script)
            return
        self._line_failed(error)
        journaling = asyncio.ensure_future(self._journal([entry]))
        self._writes.add(journaling)
        journaling.add_done_callback(self._journaled_write)

    def _journaled_write(self, done: asyncio.Future[None]) -> None:
        self._writes.discard(done)
        if not done.cancelled() and done.exception() is not None:
            log.error("journaling a budget lease write failed: %s", done.exception())

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
        up = self.line.writer is not None
        for key, lease in list(self.book.leases.items()):
            if lease.growing is not None:
                continue
            idle = not lease.in_flight and now - lease.used >= self.lease_idle
            if idle or lease.ended or lease.deadline <= now:
                self._retire(key, lease)
            elif up and now - lease.renewed >= ttl / RENEW_FRACTION:
                self._renew(lease)
        if self._retired:
            self._give_back()

    async def _reserve(
        self, scopes: Sequence[tuple[Scope, Window]], amount: int, ttl: float
    ) -> list[Hold]:
        hold_id = new_id()
        if self._down_until and not self._may_try():
            return self._without_redis(scopes, amount, hold_id, self._down_error)
        ttl_ms = int(ttl * 1000)
        taken: list[Hold] = []
        failed: tuple[list[str], StoreUnavailable] | None = None
        try:
            for scope, win in scopes:
                # spend still waiting in the journal counts as spent
                waiting = self._journaled.get((scope.name, win.id), 0)
                args = [scope.limit - waiting, amount, hold_id, ttl_ms]
                keys = _scope_keys(scope, win)
                try:
                    ok, spent, held = await self._call("reserve", keys, args)
                except StoreUnavailable as exc:
                    failed = keys, exc
                    break
                self._known[(scope.name, win.id)] = int(spent)
                if not ok:
                    balance = Balance(int(spent) + waiting, int(held))
                    raise BudgetExceeded(scope, win, balance, amount)
                taken.append(Hold(hold_id, scope, win, amount, int(spent) + waiting))
        except BudgetExceeded:
            await self._release(taken)
            raise
        if failed is None:
            return taken
        # the failed reserve may have run, or may yet run: released once redis answers, with
        # what was taken (not tried now: redis just failed)
        keys, error = failed
        unsent = [_release_entry(hold) for hold in taken]
        unsent.append(Entry("release", keys, [hold_id, ttl_ms]))  # + a tombstone
        await self._journal_releases(unsent)
        return self._without_redis(scopes, amount, hold_id, str(error))

    def _without_redis(
        self, scopes: Sequence[tuple[Scope, Window]], amount: int, hold_id: str, error: str
    ) -> list[Hold]:
        if not self.fail_open:
            raise StoreUnavailable(error)
        return self._reserve_locally(scopes, amount, hold_id)

    async def _release(self, holds: Sequence[Hold]) -> None:
        unsent: list[Entry] = []
        for hold in holds:
            if hold.lease is not None:  # admitted on a lease: its room is the lease's again
                LeaseBook.unadmit(hold)
                continue
            if hold.local:  # taken while redis was down (fail_open)
                self._local_holds.get(hold.scope.name, {}).pop(hold.id, None)
                continue
            entry = _release_entry(hold)
            try:
                await self._call("release", entry.keys, entry.args)
            except StoreUnavailable:
                unsent.append(entry)
        if unsent:
            await self._journal_releases(unsent)

    async def _journal_releases(self, entries: Sequence[Entry]) -> None:
        """Release holds once redis answers again (they move no money: `_journaled` stays)."""
        try:
            await self._journal(entries)
        except Exception:  # the local disk fails too: the holds expire after their TTL
            log.exception("journaling the release of %d budget holds failed", len(entries))

    def _local_balance(self, scope: Scope, win: Window) -> Balance:
        key = (scope.name, win.id)
        held = sum(self._local_holds.get(scope.name, {}).values())
        return Balance(self._known.get(key, 0) + self._journaled.get(key, 0), held)

    def _reserve_locally(
        self, scopes: Sequence[tuple[Scope, Window]], amount: int, hold_id: str
    ) -> list[Hold]:
        holds = []
        for scope, win in scopes:
            balance = self._local_balance(scope, win)
            if balance.spent + balance.held + amount > scope.limit:
                raise BudgetExceeded(scope, win, balance, amount)
            holds.append(Hold(hold_id, scope, win, amount, balance.spent, local=True))
        for hold in holds:
            self._local_holds.setdefault(hold.scope.name, {})[hold_id] = amount
        return holds

    def _settle_entry(
        self, hold: Hold, charge: Charge, record: RecordRef, take: int | None = None
    ) -> Entry:
        scope, win = hold.scope, hold.window
        keys = _scope_keys(scope, win)
        spent_ttl = int(win.end - time.time()) + SPENT_GRACE if win.end is not None else 0
        if carries_record([hold], record):
            record_keys = _record_keys(record.customer, record.id)
            keys += [record_keys[0], *record_keys]
            guard_ttl = 0
        else:
            day = time.strftime("%Y%m%d", time.gmtime(record.time))
            keys.append(f"rs:{{{scope.name}}}:budget:ops:{day}")
            guard_ttl = OP_GUARD_TTL
        args = [
            "" if hold.local else hold.id, charge.cost, "op:" + charge.op_id, max(spent_ttl, 0),
            guard_ttl, charge.prompt_tokens, charge.completion_tokens, repr(record.time),
            int(record.time * 1000), record.id, record.customer or "", self.retention,
        ]  # fmt: skip
        if take is not None:  # a lease's request: `take` comes off the lease's hold
            args.append(take)
            return Entry("lease_settle", keys, args, [(scope.name, win.id, charge.cost)])
        return Entry("settle", keys, args, [(scope.name, win.id, charge.cost)])

    async def settle(self, holds: Sequence[Hold], charge: Charge, record: RecordRef) -> Settled:
        # one round trip per scope, then maybe the journal: none may be cut short by a cancel
        return await asyncio.shield(self._settle(holds, charge, record))

    def settle_now(
        self, holds: Sequence[Hold], charge: Charge, record: RecordRef
    ) -> Settled | None:
        """The settle of a request admitted on leases: accounted here, its write on the
        redis socket before this returns (`wait` set when the kernel did not take all of it);
        None for any other request (then `settle`)."""
        if self.line.writer is None:
            return None
        for hold in holds:
            if hold.lease is None:
                return None
        settled = Settled()
        for hold in holds:
            self._settle_leased(hold, charge, record, settled)
        if self.line.pending():
            settled.wait = self.line.flushed()
        return settled

    def _settle_leased(
        self, hold: Hold, charge: Charge, record: RecordRef, settled: Settled
    ) -> Entry | None:
        """Local accounting, and the write sent on the line; the entry when it must be
        journaled instead (the line is down), None when nothing needs writing."""
        take = LeaseBook.settle(hold, charge.cost)
        key = (hold.scope.name, hold.window.id)
        if not (charge.cost or charge.prompt_tokens or charge.completion_tokens):
            settled.balances[hold.scope.name] = Balance(self._spent_now(key))
            return None  # nothing moves (an attempt that failed or was cut before any usage)
        entry = self._settle_entry(hold, charge, record, take)
        if self.line.writer is None:
            settled.balances[hold.scope.name] = Balance(self._spent_now(key) + charge.cost)
            return entry
        self._unanswered[key] = self._unanswered.get(key, 0) + charge.cost
        settled.balances[hold.scope.name] = Balance(self._spent_now(key))
        self._send_or_journal(entry)
        return None

    async def _settle(self, holds: Sequence[Hold], charge: Charge, record: RecordRef) -> Settled:
        settled = Settled()
        journal: list[Entry] = []
        for hold in holds:
            if hold.lease is not None:
                unsent = self._settle_leased(hold, charge, record, settled)
                if unsent is not None:
                    journal.append(unsent)
                continue
            if hold.local:
                self._local_holds.get(hold.scope.name, {}).pop(hold.id, None)
            entry = self._settle_entry(hold, charge, record)
            try:
                _fresh, spent, held = await self._call("settle", entry.keys, entry.args)
            except StoreUnavailable:
                journal.append(entry)
                continue
            self._known[(hold.scope.name, hold.window.id)] = int(spent)
            settled.balances[hold.scope.name] = Balance(int(spent), int(held))
        if journal:
            await self._journal(journal)
            for entry in journal:
                scope_name = entry.moves[0][0]
                hold = next(h for h in holds if h.scope.name == scope_name)
                settled.balances[scope_name] = self._local_balance(hold.scope, hold.window)
        if self.line.pending():
            await self.line.flushed()
        return settled

    async def balance(self, scope: Scope, win: Window) -> Balance:
        _ok, spent, held, leased = await self._call(
            "reserve", _scope_keys(scope, win), [0, 0, "", 0]
        )
        self._known[(scope.name, win.id)] = int(spent)
        return Balance(int(spent), int(held), int(leased))

    # -- usage records ---------------------------------------------------------------------
    def _finish_entries(self, item: Finished) -> list[Entry]:
        r, charge = item.record, item.charge
        fields: list[Any] = [
            "time", repr(r.time), "request_id", r.request_id, "key_id", r.key_id or "",
            "developer", r.developer or "", "customer", r.customer or "",
            "refs_tried", ",".join(r.refs_tried), "ref_used", r.ref_used or "",
            "status", "" if r.status is None else r.status,
            "latency_ms", "" if r.latency_ms is None else repr(r.latency_ms),
            "fallback", int(r.fallback), "reprompts", r.reprompts,
        ]  # fmt: skip
        args = [
            "op:" + charge.op_id, r.id, int(r.time * 1000), self.retention, charge.cost,
            charge.prompt_tokens, charge.completion_tokens,
            int((time.time() - self.retention) * 1000), *fields,
        ]  # fmt: skip
        entries = [Entry("finish", _record_keys(r.customer, r.id), args)]
        # CUSTOMERS (another slot) only lists the tags an export without a customer reads:
        # sent with a tag's first record in this process, then once a minute, not per record
        tag = record_tag(r.customer)
        now = time.monotonic()
        if now - self._indexed.get(tag, -INDEX_REFRESH_SECONDS) >= INDEX_REFRESH_SECONDS:
            if len(self._indexed) >= 100_000:
                self._indexed.clear()
            self._indexed[tag] = now
            entries.append(Entry("index", [CUSTOMERS], [tag]))
        return entries

    async def write_usage(self, finished: Sequence[Finished]) -> None:
        entries = [entry for item in finished for entry in self._finish_entries(item)]
        if not entries:
            return
        results = await asyncio.gather(
            *(self.batcher.call(e.script, e.keys, e.args) for e in entries), return_exceptions=True
        )
        unsent = [e for e, r in zip(entries, results, strict=True) if isinstance(r, UNREACHABLE)]
        if unsent:
            await self._journal(unsent)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None and not isinstance(failed, UNREACHABLE):
            raise failed  # the writer retries the batch: each finish applies once (op guard)

    async def usage(
        self, customer: str | None, since: float | None, until: float | None
    ) -> list[UsageRecord]:
        try:
            if customer is not None:
                tags = [record_tag(customer)]
            else:
                tags = sorted(_text(tag) for tag in await self.client.smembers(CUSTOMERS))
            low = "-inf" if since is None else int(since * 1000)
            high = "+inf" if until is None else f"({int(until * 1000)}"
            records: list[UsageRecord] = []
            for tag in tags:
                found = await self.client.zrangebyscore(f"rs:{{{tag}}}:usage:idx", low, high)
                ids = [_text(usage_id) for usage_id in found]
                pipe = self.client.pipeline(transaction=False)
                for usage_id in ids:
                    pipe.hgetall(f"rs:{{{tag}}}:usage:r:{usage_id}")
                for usage_id, data in zip(ids, await pipe.execute(), strict=True):
                    if data:
                        records.append(_parse(usage_id, _decoded(data)))
        except UNREACHABLE as exc:
            raise StoreUnavailable(f"redis is unreachable: {exc}") from exc
        records.sort(key=lambda r: (r.time, r.id))
        return records

    # -- the journal -----------------------------------------------------------------------
    def _note(self, entry: Entry, sign: int) -> None:
        for scope, period, nano in entry.moves:
            key = (scope, period)
            self._journaled[key] = self._journaled.get(key, 0) + sign * nano

    async def _journal(self, entries: Sequence[Entry]) -> None:
        await self.journal.append(entries)
        for entry in entries:
            self._note(entry, 1)
        self._wake.set()

    async def replay(self) -> int:
        """Apply journaled writes to redis, oldest first; stops at the first failure."""
        applied = 0
        while self.journal.pending:
            entries = await self.journal.read()
            if not entries:
                self.journal.pending = 0
                break
            for entry in entries:
                try:
                    result = await self._call(entry.script, entry.keys, entry.args)
                except StoreUnavailable:
                    return applied
                await self.journal.remove(entry)
                self._note(entry, -1)
                if entry.script in ("settle", "lease_settle"):
                    scope, period, _ = entry.moves[0]
                    self._known[(scope, period)] = int(result[1])
                applied += 1
        if applied:
            log.info("replayed %d journaled budget writes to redis", applied)
        return applied

    async def _replay_loop(self) -> None:
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that races
        # with the event being set, and the loop would then never end
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.replay_interval):
                    await self._wake.wait()
            self._wake.clear()
            if self.journal.pending:
                try:
                    await self.replay()
                except Exception:
                    log.exception("replaying the budget journal failed; will retry")

    async def close(self) -> None:
        self._closing = True
        if self._tender is not None:
            self._tender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tender
        for key, lease in list(self.book.leases.items()):
            self._retire(key, lease)  # every lease's rest goes back to the budget
        self._give_back()  # (a request still in flight after the drain: its lease expires)
        await self.line.close()
        await asyncio.sleep(0)  # the callbacks of calls the close failed: their journaling
        if self._writes:
            await asyncio.wait(set(self._writes))
        if self._replayer is not None:
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
        if self.journal.pending:
            with contextlib.suppress(Exception):
                await self.replay()
        await self.journal.close()
        await self.batcher.drain()
        await self.client.aclose()


def _text(value: Any) -> str:
    """A reply's bytes as text (the pool does not decode: see redis_pool)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _decoded(data: dict[Any, Any]) -> dict[str, str]:
    return {_text(name): _text(value) for name, value in data.items()}


def _parse(usage_id: str, data: dict[str, str]) -> UsageRecord:
    def text(name: str) -> str | None:
        return data.get(name) or None

    status = text("status")
    latency = text("latency_ms")
    refs = data.get("refs_tried", "")
    return UsageRecord(
        id=usage_id,
        time=float(data.get("time", "0")),
        request_id=data.get("request_id", ""),
        key_id=text("key_id"),
        developer=text("developer"),
        customer=text("customer"),
        refs_tried=tuple(refs.split(",")) if refs else (),
        ref_used=text("ref_used"),
        status=int(status) if status else None,
        prompt_tokens=int(data.get("prompt_tokens", 0)),
        completion_tokens=int(data.get("completion_tokens", 0)),
        cost=int(data.get("cost", 0)),
        latency_ms=float(latency) if latency else None,
        fallback=data.get("fallback") == "1",
        reprompts=int(data.get("reprompts", 0)),
    )
