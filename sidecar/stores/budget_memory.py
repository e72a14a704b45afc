"""Budgets and usage records in this process only: for tests, demos and single-replica setups
that accept losing the period's spend on restart. Nothing here awaits, so each call is atomic."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace

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

MAX_RECORDS = 100_000  # oldest records are dropped beyond this: memory is bounded


class MemoryBudgetStore:
    def __init__(
        self, max_records: int = MAX_RECORDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.clock = clock
        self._spent: dict[tuple[str, str], int] = {}
        self._holds: dict[str, dict[str, tuple[int, float]]] = {}  # scope → id → amount, expiry
        self._records: dict[str, UsageRecord] = {}
        self._order: deque[str] = deque()
        self._max_records = max_records

    def _held(self, scope: str, now: float) -> int:
        holds = self._holds.get(scope)
        if not holds:
            return 0
        expired = [hold_id for hold_id, (_, expires) in holds.items() if expires <= now]
        for hold_id in expired:
            del holds[hold_id]
        return sum(amount for amount, _ in holds.values())

    async def reserve(
        self, scopes: Sequence[tuple[Scope, Window]], amount: int, ttl: float
    ) -> list[Hold]:
        now = self.clock()
        hold_id = os.urandom(8).hex()
        holds = []
        for scope, win in scopes:
            balance = Balance(self._spent.get((scope.name, win.id), 0), self._held(scope.name, now))
            if balance.spent + balance.held + amount > scope.limit:
                raise BudgetExceeded(scope, win, balance, amount)
            holds.append(Hold(hold_id, scope, win, amount, balance.spent))
        for hold in holds:
            self._holds.setdefault(hold.scope.name, {})[hold_id] = (amount, now + ttl)
        return holds

    async def settle(self, holds: Sequence[Hold], charge: Charge, record: RecordRef) -> Settled:
        settled = Settled()
        now = self.clock()
        for hold in holds:
            self._holds.get(hold.scope.name, {}).pop(hold.id, None)
            key = (hold.scope.name, hold.window.id)
            self._spent[key] = self._spent.get(key, 0) + charge.cost
            settled.balances[hold.scope.name] = Balance(
                self._spent[key], self._held(hold.scope.name, now)
            )
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
            cost, prompt, completion = found.cost, found.prompt_tokens, found.completion_tokens
            self._records[record.id] = replace(
                record, cost=cost, prompt_tokens=prompt, completion_tokens=completion
            )
            _add(self._records[record.id], item.charge)

    async def balance(self, scope: Scope, win: Window) -> Balance:
        return Balance(
            self._spent.get((scope.name, win.id), 0), self._held(scope.name, self.clock())
        )

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
