"""Budget leases of the redis store, in process against a real redis-server: requests admitted
on a process's slice of a budget with no round trip, settled with one write each; never over
the limit, spent equal to the usage records, nothing left held once leases are given back."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio

from sidecar.addons.budget import refusal
from sidecar.stores.budget import (
    BudgetExceeded,
    Charge,
    Hold,
    RecordRef,
    Scope,
    Window,
    window,
)
from sidecar.stores.budget_redis import RedisBudgetStore, _scope_keys
from sidecar.stores.redis_pool import redis_client
from tests.procs import RedisProcess

pytestmark = pytest.mark.redis

WORST = 1_000_000  # a request's worst case, nano-USD
WIN = window("total")


def cust(limit: int) -> Scope:
    return Scope("cust", "c_" + os.urandom(6).hex(), limit, "total")


@pytest.fixture
async def opened(
    redis_server: RedisProcess, tmp_path: Path
) -> AsyncIterator[Callable[..., RedisBudgetStore]]:
    """Opens leasing stores (each a sidecar process of its own) on the session's redis."""
    stores: list[RedisBudgetStore] = []

    async def make(url: str = redis_server.url, **options: float) -> RedisBudgetStore:
        journal = str(tmp_path / f"journal{len(stores)}.db")
        settings = {"leases": True, "ttl": 60.0, **options}
        store = RedisBudgetStore(redis_client(url, 8), journal, **settings)  # type: ignore[arg-type]
        await store.open()
        stores.append(store)
        return store

    yield make  # type: ignore[misc]
    for store in stores:
        if not store._closing:
            await store.close()


async def held(url: str, scope: Scope, win: Window = WIN) -> tuple[int, int, int]:
    """spent, held, and the part of held that is leases, as redis has them."""
    client = redis.asyncio.Redis.from_url(url)
    try:
        keys = _scope_keys(scope, win)
        spent, total, amounts = await asyncio.gather(
            client.get(keys[0]), client.get(keys[1]), client.hget(keys[3], "~leased")
        )
    finally:
        await client.aclose()
    return int(spent or 0), int(total or 0), int(amounts or 0)


class Admitted:
    """What a request did: whether it was admitted with no round trip, on a lease."""

    def __init__(self) -> None:
        self.at_once = 0
        self.leased = 0
        self.costs: list[int] = []


async def one_request(
    store: RedisBudgetStore,
    scopes: list[Scope],
    cost: int,
    seen: Admitted,
    customer: str | None,
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
    record = RecordRef("u_" + os.urandom(6).hex(), customer, time.time())
    charge = Charge(record.id + ":1", cost, 10, 20)
    settled = store.settle_now(holds, charge, record)
    if settled is None:
        await store.settle(holds, charge, record)
    elif settled.wait is not None:
        await settled.wait
    seen.costs.append(cost)
    return True


async def records_cost(store: RedisBudgetStore, customer: str) -> int:
    return sum(record.cost for record in await store.usage(customer, None, None))


async def test_two_processes_at_400_requests_never_exceed_the_limit(
    opened: Callable[..., RedisBudgetStore], redis_server: RedisProcess
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
            return await one_request(store, [scope], costs[index], seen, scope.ident, 0.005)

    results = await asyncio.gather(*(request(i) for i in range(400)))

    spent, _, _ = await held(redis_server.url, scope)
    assert spent == sum(seen.costs) <= limit
    assert spent == await records_cost(first, scope.ident)  # the books are exact
    # a refusal comes only when what is spent and what the 20 requests in flight hold (on
    # leases or alone) leave less than a worst case
    assert limit - spent < 21 * WORST
    assert sum(results) == len(seen.costs) and 0 < len(seen.costs) < 400
    assert seen.leased > 0.7 * len(seen.costs)  # most were admitted on a lease
    await first.close()
    await second.close()
    assert await held(redis_server.url, scope) == (spent, 0, 0)  # every lease given back


async def evalsha_calls(url: str) -> int:
    client = redis.asyncio.Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_requests_on_a_lease_make_no_budget_round_trip(
    opened: Callable[..., RedisBudgetStore], redis_server: RedisProcess
) -> None:
    store = await opened()  # type: ignore[misc]
    scope = cust(10_000 * WORST)
    seen = Admitted()
    before = await evalsha_calls(redis_server.url)
    for _ in range(10):  # waves of 20 concurrent requests
        await asyncio.gather(
            *(one_request(store, [scope], WORST // 2, seen, scope.ident) for _ in range(20))
        )
    calls = await evalsha_calls(redis_server.url) - before

    # one settle write per request, and a lease call per slice spent (a slice: 16 worst
    # cases, or what the requests in flight hold; a request spends half its worst case)
    assert 200 < calls <= 200 + 12
    spent, total, leased = await held(redis_server.url, scope)
    assert spent == 200 * (WORST // 2)
    assert total == leased > 0  # what the lease holds, and nothing else


async def test_slices_shrink_near_the_limit_then_requests_hold_alone(
    opened: Callable[..., RedisBudgetStore], redis_server: RedisProcess
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
    assert await held(redis_server.url, scope) == (0, 10 * WORST, 2 * WORST)
    message = refusal(refused.value).message
    assert "spent $0.0 (+$0.008 held by requests in flight)" in message
    assert "(+$0.002 held by sidecar processes' budget leases" in message


async def test_a_key_and_a_customer_budget_are_admitted_together_or_not_at_all(
    opened: Callable[..., RedisBudgetStore], redis_server: RedisProcess
) -> None:
    store = await opened()  # type: ignore[misc]
    customer, key = cust(1000 * WORST), Scope("key", "k_" + os.urandom(6).hex(), 6 * WORST, "total")
    seen = Admitted()

    results = await asyncio.gather(
        *(one_request(store, [customer, key], WORST, seen, customer.ident, 0.01) for _ in range(20))
    )

    answered = sum(results)
    assert 1 <= answered <= 6
    for scope in (customer, key):  # both charged for exactly the requests admitted
        assert (await held(redis_server.url, scope))[0] == answered * WORST
    assert await records_cost(store, customer.ident) == answered * WORST
    for lease in store.book.leases.values():  # a refusal on the key left the customer's lease
        assert (lease.reserved, lease.in_flight) == (0, 0)
    await store.close()
    assert (await held(redis_server.url, customer))[1:] == (0, 0)
    assert (await held(redis_server.url, key))[1:] == (0, 0)


async def test_a_lease_in_use_is_renewed_past_its_ttl(
    opened: Callable[..., RedisBudgetStore], redis_server: RedisProcess
) -> None:
    store = await opened(ttl=1.5)  # type: ignore[misc]
    scope = cust(1000 * WORST)
    seen = Admitted()
    await one_request(store, [scope], WORST // 10, seen, scope.ident)
    (lease,) = store.book.leases.values()
    started = time.monotonic()
    while time.monotonic() - started < 4.0:  # used all along, nearly three TTLs
        await one_request(store, [scope], WORST // 10, seen, scope.ident)
        await asyncio.sleep(0.05)

    assert list(store.book.leases.values()) == [lease]  # the same lease, never expired
    assert seen.at_once == len(seen.costs) - 1
    spent, total, leased = await held(redis_server.url, scope)
    assert spent == sum(seen.costs) and total == leased == lease.amount > 0


async def test_an_idle_lease_is_given_back(
    opened: Callable[..., RedisBudgetStore], redis_server: RedisProcess
) -> None:
    store = await opened(lease_idle=0.3)  # type: ignore[misc]
    scope = cust(1000 * WORST)
    await one_request(store, [scope], WORST // 2, Admitted(), scope.ident)
    assert (await held(redis_server.url, scope))[1] > 0

    await asyncio.sleep(1.2)

    assert await held(redis_server.url, scope) == (WORST // 2, 0, 0)
    assert not store.book.leases


async def test_close_gives_every_lease_back(
    opened: Callable[..., RedisBudgetStore], redis_server: RedisProcess
) -> None:
    store = await opened()  # type: ignore[misc]
    scopes = [cust(1000 * WORST) for _ in range(3)]
    for scope in scopes:
        await one_request(store, [scope], 7, Admitted(), scope.ident)
    for scope in scopes:
        assert (await held(redis_server.url, scope))[2] > 0

    await store.close()

    for scope in scopes:
        assert await held(redis_server.url, scope) == (7, 0, 0)


async def test_a_cancelled_reserve_leaves_nothing_held(
    opened: Callable[..., RedisBudgetStore], redis_server: RedisProcess
) -> None:
    store = await opened()  # type: ignore[misc]
    scope = cust(1000 * WORST)
    reserving = [
        asyncio.ensure_future(store.reserve([(scope, WIN)], WORST, 60.0)) for _ in range(5)
    ]
    await asyncio.sleep(0)  # the lease's call is written
    for task in reserving:
        task.cancel()
    await asyncio.gather(*reserving, return_exceptions=True)
    await asyncio.sleep(0.1)  # the lease's reply (the releases of the cancelled reserves)

    (lease,) = store.book.leases.values()
    assert (lease.reserved, lease.in_flight) == (0, 0)
    await store.close()
    assert await held(redis_server.url, scope) == (0, 0, 0)


@pytest.fixture
def private_redis() -> AsyncIterator[RedisProcess]:
    if RedisProcess.binary() is None:
        pytest.skip("redis-server not found")
    server = RedisProcess().start()
    yield server  # type: ignore[misc]
    if server.proc is not None:
        server.proc.send_signal(signal.SIGCONT)
    server.stop()


async def test_a_settle_whose_reply_is_lost_is_journaled_and_applied_once(
    opened: Callable[..., RedisBudgetStore], private_redis: RedisProcess
) -> None:
    """Redis frozen past the line's 2 s reply timeout with a settle in its socket: the settle
    is journaled, redis runs it when it wakes, the journal replays it: counted once."""
    store = await opened(url=private_redis.url)  # type: ignore[misc]
    scope = cust(1000 * WORST)
    await one_request(store, [scope], 5, Admitted(), scope.ident)
    holds = store.reserve_now([(scope, WIN)], WORST, 60.0)
    assert holds is not None and private_redis.proc is not None
    private_redis.proc.send_signal(signal.SIGSTOP)
    try:
        record = RecordRef("u_lost", scope.ident, time.time())
        settled = store.settle_now(holds, Charge("u_lost:1", 300, 1, 2), record)
        assert settled is not None  # written to the socket at once
        await asyncio.sleep(2.5)  # no reply: the line fails, the settle goes to the journal
        assert store.journal.pending >= 1
    finally:
        private_redis.proc.send_signal(signal.SIGCONT)
    for _ in range(100):  # the journal is replayed once redis answers
        if store.journal.pending == 0:
            break
        await asyncio.sleep(0.1)

    assert store.journal.pending == 0
    assert (await held(private_redis.url, scope))[0] == 305  # the lost settle counted once
    assert await records_cost(store, scope.ident) == 305
    await store.close()
    assert await held(private_redis.url, scope) == (305, 0, 0)


async def test_a_lower_limit_after_a_reload_is_not_admitted_on_the_old_lease(
    opened: Callable[..., RedisBudgetStore], redis_server: RedisProcess
) -> None:
    store = await opened()  # type: ignore[misc]
    before = cust(1000 * WORST)
    await one_request(store, [before], WORST // 2, Admitted(), before.ident)
    after = Scope("cust", before.ident, 3 * WORST, "total")  # the reloaded config's budget

    assert store.reserve_now([(after, WIN)], WORST, 60.0) is None
    kept = []
    with pytest.raises(BudgetExceeded):
        for _ in range(5):
            kept.append(await store.reserve([(after, WIN)], WORST, 60.0))

    assert len(kept) == 2  # $0.0025 left under the new limit: two worst cases, held alone
    spent, total, leased = await held(redis_server.url, before)
    assert (spent, total, leased) == (WORST // 2, 2 * WORST, 0)  # the old lease went back


async def test_a_line_closed_by_redis_is_opened_again_by_the_next_request(
    opened: Callable[..., RedisBudgetStore], redis_server: RedisProcess
) -> None:
    """Redis closes idle clients after its `timeout`, or an operator kills them: the next
    request is served (the line reconnects) on the same lease, still held in redis."""
    store = await opened()  # type: ignore[misc]
    scope = cust(1000 * WORST)
    seen = Admitted()
    await one_request(store, [scope], 100, seen, scope.ident)
    (lease,) = store.book.leases.values()
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        assert await admin.client_kill_filter(_type="normal", skipme=True) >= 1
    finally:
        await admin.aclose()
    await asyncio.sleep(0.1)  # the line sees its connection closed

    assert store.line.writer is None
    assert await one_request(store, [scope], 200, seen, scope.ident)
    assert list(store.book.leases.values()) == [lease] and seen.leased == 2
    await store.close()
    assert await held(redis_server.url, scope) == (300, 0, 0)
    assert await records_cost(store, scope.ident) == 300
