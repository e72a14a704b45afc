"""Budget leases of the sqlite store, in process on a real sqlite file: requests admitted on a
process's slice of a budget with no transaction, each settled with one group-commit call;
never over the limit (two stores on one file stand for two processes), spent equal to the
usage records, nothing left held once leases are given back or, after a crash, expired."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from sidecar.addons.budget import refusal
from sidecar.stores.budget import BudgetExceeded, Charge, Hold, RecordRef, Scope, window
from sidecar.stores.budget_sqlite import SqliteBudgetStore

WORST = 1_000_000  # a request's worst case, nano-USD
WIN = window("total")
ROOT = Path(__file__).resolve().parent.parent


def cust(limit: int) -> Scope:
    return Scope("cust", "c_" + os.urandom(6).hex(), limit, "total")


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "budget.db")


@pytest.fixture
async def opened(db_path: str) -> AsyncIterator[Callable[..., SqliteBudgetStore]]:
    """Opens leasing stores on one file (each stands for a sidecar process of its own)."""
    stores: list[SqliteBudgetStore] = []

    async def make(**options: float) -> SqliteBudgetStore:
        settings = {"leases": True, "ttl": 60.0, **options}
        store = SqliteBudgetStore(db_path, **settings)  # type: ignore[arg-type]
        await store.open()
        stores.append(store)
        return store

    yield make  # type: ignore[misc]
    for store in stores:
        if not store._closing:
            await store.close()


def books(path: str, scope: Scope) -> tuple[int, int, int, int]:
    """spent, held (unexpired), the part of held that is leases, and the records' costs, as
    the file has them (read with a connection of its own)."""
    db = sqlite3.connect(path)
    try:
        now = time.time()
        (spent,) = db.execute(
            "SELECT COALESCE(SUM(spent), 0) FROM budget_spent WHERE scope = ?", (scope.name,)
        ).fetchone()
        held, leased = db.execute(
            "SELECT COALESCE(SUM(amount), 0), COALESCE(SUM(CASE WHEN id LIKE 'L%' "
            "THEN amount END), 0) FROM budget_hold WHERE scope = ? AND expires > ?",
            (scope.name, now),
        ).fetchone()
        (records,) = db.execute(
            "SELECT COALESCE(SUM(cost), 0) FROM usage_record WHERE customer = ?", (scope.ident,)
        ).fetchone()
    finally:
        db.close()
    return spent, held, leased, records


async def nothing_held(path: str, scope: Scope, seconds: float) -> None:
    """Wait (up to `seconds`) until the file holds nothing for the scope."""
    for _ in range(int(seconds / 0.1)):
        if not books(path, scope)[1]:
            return
        await asyncio.sleep(0.1)


class Admitted:
    """What requests did: admitted with no transaction, on a lease; what they cost."""

    def __init__(self) -> None:
        self.at_once = 0
        self.leased = 0
        self.costs: list[int] = []


async def one_request(
    store: SqliteBudgetStore,
    scopes: list[Scope],
    cost: int,
    seen: Admitted,
    upstream: float = 0.0,
) -> bool:
    """A request as the budget addon makes it: reserve, the upstream call, settle."""
    windows = [(scope, WIN) for scope in scopes]
    holds = store.reserve_now(windows, WORST, 60.0)
    if holds is not None:
        seen.at_once += 1
    else:
        try:
            holds = await store.reserve(windows, WORST, 60.0)
        except BudgetExceeded:
            return False
    if holds[0].lease is not None:
        seen.leased += 1
    await asyncio.sleep(upstream)
    record = RecordRef("u_" + os.urandom(6).hex(), scopes[0].ident, time.time())
    charge = Charge(record.id + ":1", cost, 10, 20)
    settled = store.settle_now(holds, charge, record)
    if settled is None:
        await store.settle(holds, charge, record)
    elif settled.wait is not None:
        await settled.wait
    seen.costs.append(cost)
    return True


async def test_two_processes_at_400_requests_never_exceed_the_limit(
    opened: Callable[..., SqliteBudgetStore], db_path: str
) -> None:
    limit = 120 * WORST
    scope = cust(limit)
    first, second = await opened(), await opened()  # type: ignore[misc]
    seen = Admitted()
    rng = random.Random(7)
    costs = [rng.randrange(WORST // 4, WORST + 1) for _ in range(400)]
    gates = [asyncio.Semaphore(10), asyncio.Semaphore(10)]  # 10 in flight in each process

    async def request(index: int) -> bool:
        async with gates[index % 2]:
            store = (first, second)[index % 2]
            return await one_request(store, [scope], costs[index], seen, 0.002)

    results = await asyncio.gather(*(request(i) for i in range(400)))

    spent, _, _, records = books(db_path, scope)
    assert spent == sum(seen.costs) == records <= limit  # the books are exact
    # a refusal comes only when what is spent and what the 20 requests in flight hold (on
    # leases or alone) leave less than a worst case
    assert limit - spent < 21 * WORST
    assert sum(results) == len(seen.costs) and 0 < len(seen.costs) < 400
    assert seen.leased > 0.7 * len(seen.costs)  # most were admitted on a lease
    await first.close()
    await second.close()
    assert books(db_path, scope) == (spent, 0, 0, spent)  # every lease given back


async def test_a_leased_request_makes_one_transaction_its_settle(
    opened: Callable[..., SqliteBudgetStore], db_path: str
) -> None:
    store = await opened()  # type: ignore[misc]
    scope = cust(10_000 * WORST)
    seen = Admitted()
    await one_request(store, [scope], WORST // 2, seen)  # takes the lease
    counted: list[str] = []
    db = store._loop_db
    assert db is not None
    db.set_trace_callback(counted.append)  # every statement the loop's connection runs
    for _ in range(10):
        await one_request(store, [scope], WORST // 2, seen)
    db.set_trace_callback(None)

    assert seen.at_once == 10  # admitted with no transaction
    # one transaction a request: its settle (the lease's row, spent, the record), no reserve
    assert counted.count("BEGIN IMMEDIATE") == 10
    assert not any("INSERT INTO budget_hold" in sql for sql in counted)
    spent, held, leased, records = books(db_path, scope)
    assert spent == records == 11 * (WORST // 2)
    assert held == leased > 0  # what the lease holds, and nothing else


async def test_settles_of_one_turn_share_one_call_each_record_its_own_cost(
    opened: Callable[..., SqliteBudgetStore], db_path: str
) -> None:
    store = await opened()  # type: ignore[misc]
    scope = cust(10_000 * WORST)
    windows = [(scope, WIN)]
    first = await store.reserve(windows, WORST, 60.0)
    admitted = [first] + [store.reserve_now(windows, WORST, 60.0) for _ in range(15)]
    assert all(holds is not None and holds[0].lease is not None for holds in admitted)
    lease = first[0].lease
    _, _, leased_before, _ = books(db_path, scope)
    counted: list[str] = []
    db = store._loop_db
    assert db is not None
    db.set_trace_callback(counted.append)
    records = [
        RecordRef(f"u{i}_" + os.urandom(4).hex(), scope.ident, time.time()) for i in range(16)
    ]
    waits = []
    for i, (holds, record) in enumerate(zip(admitted, records, strict=True)):
        assert holds is not None
        cost = (i + 1) * 10_000  # each less than its worst case: the lease gives up its cost
        settled = store.settle_now(holds, Charge(record.id + ":1", cost, i, 1), record)
        assert settled is not None and settled.wait is not None
        waits.append(settled.wait)
    await asyncio.gather(*waits)
    db.set_trace_callback(None)

    costs = [(i + 1) * 10_000 for i in range(16)]
    assert counted.count("BEGIN IMMEDIATE") == 1  # one transaction for the 16 settles
    assert sum("UPDATE budget_hold" in sql for sql in counted) == 1  # the lease's row once
    spent, held, leased, recorded = books(db_path, scope)
    assert spent == recorded == sum(costs)
    assert held == leased == leased_before - sum(costs) == lease.amount
    by_id = {r.id: r for r in await store.usage(scope.ident, None, None)}
    assert [by_id[r.id].cost for r in records] == costs
    assert [by_id[r.id].prompt_tokens for r in records] == list(range(16))


async def test_slices_shrink_near_the_limit_then_requests_hold_alone(
    opened: Callable[..., SqliteBudgetStore], db_path: str
) -> None:
    store = await opened()  # type: ignore[misc]
    scope = cust(10 * WORST)
    kept: list[list[Hold]] = []
    for _ in range(10):  # every one stays in flight
        kept.append(await store.reserve([(scope, WIN)], WORST, 60.0))
    with pytest.raises(BudgetExceeded) as refused:
        await store.reserve([(scope, WIN)], WORST, 60.0)

    # the first lease took a quarter of the free room (2.5 worst cases: two requests); then a
    # quarter was less than two worst cases: the lease gave back its unused half and the others
    # each held their own worst case, up to the limit exactly
    assert [holds[0].lease is not None for holds in kept] == [True] * 2 + [False] * 8
    assert books(db_path, scope) == (0, 10 * WORST, 2 * WORST, 0)
    message = refusal(refused.value).message
    assert "spent $0.0 (+$0.008 held by requests in flight)" in message
    assert "(+$0.002 held by sidecar processes' budget leases" in message

    for holds in kept:  # all settle at their worst case: the limit is spent exactly
        record = RecordRef("u_" + os.urandom(6).hex(), scope.ident, time.time())
        charge = Charge(record.id + ":1", WORST, 1, 1)
        settled = store.settle_now(holds, charge, record)
        if settled is None:
            await store.settle(holds, charge, record)
        elif settled.wait is not None:
            await settled.wait
    assert books(db_path, scope) == (10 * WORST, 0, 0, 10 * WORST)


async def test_sequential_requests_spend_the_budget_to_its_last_worst_case(
    opened: Callable[..., SqliteBudgetStore], db_path: str
) -> None:
    store = await opened()  # type: ignore[misc]
    scope = cust(100 * WORST)
    seen = Admitted()
    while await one_request(store, [scope], WORST, seen):
        pass
    assert len(seen.costs) == 100  # leases near the limit do not strand room
    assert seen.leased >= 60  # far from it, on a lease
    assert books(db_path, scope)[0::3] == (100 * WORST, 100 * WORST)


async def test_a_lease_is_shared_with_another_process_only_as_a_hold(
    opened: Callable[..., SqliteBudgetStore], db_path: str
) -> None:
    """A lease in the file counts against another process's reserves, and its refusal says
    how much of what is held is leases."""
    first, second = await opened(), await opened()  # type: ignore[misc]
    scope = cust(40 * WORST)
    seen = Admitted()
    await one_request(first, [scope], WORST, seen)
    _, held, leased, _ = books(db_path, scope)
    assert held == leased > 0
    alone = SqliteBudgetStore(db_path)  # no leases: one per-request hold
    await alone.open()
    try:
        with pytest.raises(BudgetExceeded) as refused:
            await alone.reserve([(scope, WIN)], 40 * WORST - WORST - leased + 1, 60.0)
        assert refused.value.balance.leased == leased
        assert "held by sidecar processes' budget leases" in refusal(refused.value).message
        await alone.reserve([(scope, WIN)], 40 * WORST - WORST - leased, 60.0)
    finally:
        await alone.close()
    assert not await one_request(second, [scope], WORST, seen)  # nothing left to lease
    assert books(db_path, scope)[0] == WORST


async def test_an_idle_lease_is_given_back(
    opened: Callable[..., SqliteBudgetStore], db_path: str
) -> None:
    store = await opened(lease_idle=0.3)  # type: ignore[misc]
    scope = cust(1000 * WORST)
    seen = Admitted()
    for _ in range(5):
        await one_request(store, [scope], WORST, seen)
    assert books(db_path, scope)[2] > 0
    await nothing_held(db_path, scope, 5.0)
    assert books(db_path, scope) == (5 * WORST, 0, 0, 5 * WORST)
    assert not store.book.leases
    await one_request(store, [scope], WORST, seen)  # a new lease, as needed
    assert books(db_path, scope)[2] > 0


async def test_close_gives_every_lease_back(
    opened: Callable[..., SqliteBudgetStore], db_path: str
) -> None:
    store = await opened(lease_idle=600)  # type: ignore[misc]
    scopes = [cust(1000 * WORST), cust(1000 * WORST)]
    seen = Admitted()
    for scope in scopes:
        await asyncio.gather(*(one_request(store, [scope], WORST, seen) for _ in range(5)))
        assert books(db_path, scope)[2] > 0
    await store.close()
    for scope in scopes:
        assert books(db_path, scope) == (5 * WORST, 0, 0, 5 * WORST)


async def test_a_lease_is_renewed_past_its_ttl_while_used(
    opened: Callable[..., SqliteBudgetStore], db_path: str
) -> None:
    store = await opened(ttl=1.0)  # type: ignore[misc]
    scope = cust(10_000 * WORST)
    seen = Admitted()
    windows = [(scope, WIN)]
    first = await store.reserve(windows, WORST, 1.0)
    lease = first[0].lease
    started = time.monotonic()
    while time.monotonic() - started < 2.5:  # 2.5 TTLs
        holds = store.reserve_now(windows, WORST, 1.0) or await store.reserve(windows, WORST, 1.0)
        record = RecordRef("u_" + os.urandom(6).hex(), scope.ident, time.time())
        settled = store.settle_now(holds, Charge(record.id + ":1", 1000, 1, 1), record)
        assert settled is not None and settled.wait is not None
        await settled.wait
        seen.costs.append(1000)
        await asyncio.sleep(0.02)
    assert store.book.leases[(scope.name, WIN.id)] is lease  # the same lease, renewed
    _, held, leased, _ = books(db_path, scope)
    assert held == leased > 0  # unexpired in the file
    store.settle_now(first, Charge("x:1", 0, 0, 0), RecordRef("x", scope.ident, time.time()))
    spent, _, _, records = books(db_path, scope)
    assert spent == records == sum(seen.costs)


async def test_a_cancelled_reserve_leaves_nothing_held(
    opened: Callable[..., SqliteBudgetStore], db_path: str
) -> None:
    store = await opened(lease_idle=0.2)  # type: ignore[misc]
    scope = cust(1000 * WORST)
    reserving = asyncio.ensure_future(store.reserve([(scope, WIN)], WORST, 60.0))
    await asyncio.sleep(0)
    reserving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reserving
    await nothing_held(db_path, scope, 5.0)
    assert books(db_path, scope) == (0, 0, 0, 0)
    assert all(lease.reserved == 0 for lease in store.book.leases.values())


CRASHING = """
import asyncio, os, sys, time
from sidecar.stores.budget import Charge, RecordRef, Scope, window
from sidecar.stores.budget_sqlite import SqliteBudgetStore

async def main():
    path, ident, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = SqliteBudgetStore(path, leases=True, ttl=2.0, lease_idle=600)
    await store.open()
    scope, win = Scope("cust", ident, limit, "total"), window("total")
    for i in range(10):
        holds = store.reserve_now([(scope, win)], 1_000_000, 2.0) or await store.reserve(
            [(scope, win)], 1_000_000, 2.0)
        record = RecordRef(f"u{i}", ident, time.time())
        settled = store.settle_now(holds, Charge(f"u{i}:1", 700_000, 1, 1), record)
        await settled.wait
    store.reserve_now([(scope, win)], 1_000_000, 2.0)  # one more in flight, never settled
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_kill_9_with_a_lease_open_frees_it_at_its_ttl(db_path: str) -> None:
    scope = cust(100 * WORST)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING, db_path, scope.ident, str(scope.limit),
        cwd=ROOT, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"ready"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        await proc.wait()
    spent, held, leased, records = books(db_path, scope)
    assert spent == records == 10 * 700_000  # every settled answer is in the file
    assert held == leased > 0  # the dead process's lease, until its TTL

    survivor = SqliteBudgetStore(db_path, leases=True, ttl=60.0)
    await survivor.open()
    try:
        seen = Admitted()
        while await one_request(survivor, [scope], WORST, seen):
            pass
        before_ttl, _, _, records = books(db_path, scope)
        assert before_ttl == records <= scope.limit - leased  # the dead lease's room is held
        await asyncio.sleep(2.2)  # the dead lease expires: its room is free again
        while await one_request(survivor, [scope], WORST, seen):
            pass
    finally:
        await survivor.close()
    spent, held, leased, records = books(db_path, scope)
    assert (held, leased) == (0, 0)
    assert spent == records == 10 * 700_000 + len(seen.costs) * WORST
    assert spent > before_ttl and scope.limit - WORST < spent <= scope.limit  # and now spent
