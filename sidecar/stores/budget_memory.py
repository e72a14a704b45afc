"""Budgets and usage records in this process only: for tests, demos and single-replica setups
that accept losing the period's spend on restart. Nothing here awaits, so each call is atomic."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace

from sidecar.ids import new_id
from sidecar.stores.budget import (
    Balance,
    BudgetExceeded,
    Charge,
    Finished,
    Hold,
    RecordRef,
    Scope,
    Settled,
    UsageRecord,
    Window,
    carries_record,
)

# oldest records are dropped beyond this: a record holds ≈ 0.55 KB here, so 20,000 ≈ 11 MiB of
# the sidecar's memory (100,000 made the process ≈ 55 MiB larger after a busy minute)
MAX_RECORDS = 20_000
SWEEP_SECONDS = 1.0  # how often expired holds are looked for


class MemoryBudgetStore:
    def __init__(
        self, max_records: int = MAX_RECORDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.clock = clock
        self._spent: dict[tuple[str, str], int] = {}
        self._holds: dict[str, dict[str, tuple[int, float]]] = {}  # scope → id → amount, expiry
        self._held: dict[str, int] = {}  # scope → sum of its holds
        self._next_sweep = 0.0
        self._records: dict[str, UsageRecord] = {}
        self._order: deque[str] = deque()
        self._max_records = max_records

    def _sweep(self, now: float) -> None:
        """Drop expired holds (a hold outlives its request only if its settle never ran)."""
        self._next_sweep = now + SWEEP_SECONDS
        for scope, holds in self._holds.items():
            expired = [hold_id for hold_id, (_, expires) in holds.items() if expires <= now]
            for hold_id in expired:
                self._held[scope] -= holds.pop(hold_id)[0]

    async def reserve(
        self, scopes: Sequence[tuple[Scope, Window]], amount: int, ttl: float
    ) -> list[Hold]:
        return self.reserve_now(scopes, amount, ttl)

    def reserve_now(
        self, scopes: Sequence[tuple[Scope, Window]], amount: int, ttl: float
    ) -> list[Hold]:
        """`reserve` without the coroutine: the budget addon calls this one directly."""
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        spent, held = self._spent, self._held
        for scope, win in scopes:
            scope_spent, scope_held = spent.get((scope.name, win.id), 0), held.get(scope.name, 0)
            if scope_spent + scope_held + amount > scope.limit:
                raise BudgetExceeded(scope, win, Balance(scope_spent, scope_held), amount)
        hold_id = new_id()
        holds = []
        for scope, win in scopes:
            holds.append(Hold(hold_id, scope, win, amount, spent.get((scope.name, win.id), 0)))
            self._holds.setdefault(scope.name, {})[hold_id] = (amount, now + ttl)
            held[scope.name] = held.get(scope.name, 0) + amount
        return holds

    async def settle(self, holds: Sequence[Hold], charge: Charge, record: RecordRef) -> Settled:
        return self.settle_now(holds, charge, record)

    def settle_now(self, holds: Sequence[Hold], charge: Charge, record: RecordRef) -> Settled:
        """`settle` without the coroutine."""
        settled = Settled()
        spent, held = self._spent, self._held
        for hold in holds:
            name = hold.scope.name
            taken = self._holds.get(name, {}).pop(hold.id, None)
            if taken is not None:
                held[name] -= taken[0]
            key = (name, hold.window.id)
            spent[key] = spent.get(key, 0) + charge.cost
            settled.balances[name] = Balance(spent[key], held.get(name, 0))
        if carries_record(holds, record):
            _add(self._record(record.id, record.customer, record.time), charge)
        return settled

    def _record(self, record_id: str, customer: str | None, at: float) -> UsageRecord:
        found = self._records.get(record_id)
        if found is None:
            found = self._records[record_id] = UsageRecord(record_id, at, customer=customer)
            self._order.append(record_id)
            while len(self._order) > self._max_records:
                self._records.pop(self._order.popleft(), None)
        return found

    async def write_usage(self, finished: Sequence[Finished]) -> None:
        for item in finished:
            record = item.record
            found = self._record(record.id, record.customer, record.time)
            # the finished record replaces the one the settles added to, keeping their sums
            record.cost = found.cost
            record.prompt_tokens = found.prompt_tokens
            record.completion_tokens = found.completion_tokens
            self._records[record.id] = record
            _add(record, item.charge)

    async def balance(self, scope: Scope, win: Window) -> Balance:
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        return Balance(self._spent.get((scope.name, win.id), 0), self._held.get(scope.name, 0))

    async def usage(
        self, customer: str | None, since: float | None, until: float | None
    ) -> list[UsageRecord]:
        found = [
            replace(r)
            for r in self._records.values()
            if (customer is None or r.customer == customer)
            and (since is None or r.time >= since)
            and (until is None or r.time < until)
        ]
        found.sort(key=lambda r: r.time)
        return found

    async def close(self) -> None:
        return None


def _add(record: UsageRecord, charge: Charge) -> None:
    record.cost += charge.cost
    record.prompt_tokens += charge.prompt_tokens
    record.completion_tokens += charge.completion_tokens
