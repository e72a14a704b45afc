"""The redis budget store against a real redis-server: a reserve whose outcome is unknown (its
reply lost, or the call still on its way) never leaves a hold behind, whatever order its late
copy and its release reach redis in."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from sidecar.stores.budget import (
    Charge,
    Finished,
    Scope,
    StoreUnavailable,
    UsageRecord,
    window,
)
from sidecar.stores.budget_redis import RedisBudgetStore, _scope_keys
from sidecar.stores.redis_pool import redis_client
from tests.procs import RedisProcess

pytestmark = pytest.mark.redis

LIMIT = 1_000_000
AMOUNT = 1_000
TTL_MS = 60_000
WIN = window("total")


@pytest.fixture
def scope() -> Scope:
    return Scope("cust", "c_" + os.urandom(6).hex(), LIMIT, "total")


@pytest.fixture
async def store(redis_server: RedisProcess, tmp_path: Path) -> AsyncIterator[RedisBudgetStore]:
    opened = RedisBudgetStore(redis_client(redis_server.url, 8), str(tmp_path / "journal.db"))
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
def stopped_redis() -> Iterator[RedisProcess]:
    """A redis-server of this test alone, not started yet: its port refuses connections."""
    if RedisProcess.binary() is None:
        pytest.skip("redis-server not found")
    server = RedisProcess()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


async def reserve_copy(store: RedisBudgetStore, scope: Scope, hold_id: str) -> list[int]:
    """One copy of the RESERVE call a `reserve` of `hold_id` sends, as redis would run it."""
    args = [scope.limit, AMOUNT, hold_id, TTL_MS]
    return [int(n) for n in await store.batcher.call("reserve", _scope_keys(scope, WIN), args)]


async def release_unknown(store: RedisBudgetStore, scope: Scope, hold_id: str, ttl_ms: int) -> None:
    """The release the store journals for a reserve whose outcome it does not know."""
    await store.batcher.call("release", _scope_keys(scope, WIN), [hold_id, ttl_ms])


async def test_a_reserve_that_arrives_after_its_release_holds_nothing(
    store: RedisBudgetStore, scope: Scope
) -> None:
    await release_unknown(store, scope, "h1", TTL_MS)

    ok, _spent, held = await reserve_copy(store, scope, "h1")

    assert (ok, held) == (0, 0)
    assert (await store.balance(scope, WIN)).held == 0


async def test_a_release_after_its_reserve_frees_the_hold_and_refuses_a_later_copy(
    store: RedisBudgetStore, scope: Scope
) -> None:
    assert (await reserve_copy(store, scope, "h1"))[0] == 1
    await release_unknown(store, scope, "h1", TTL_MS)
    assert (await store.balance(scope, WIN)).held == 0

    assert (await reserve_copy(store, scope, "h1"))[0] == 0  # a second copy, later still
    assert (await store.balance(scope, WIN)).held == 0


async def test_a_reserve_sent_twice_holds_once(store: RedisBudgetStore, scope: Scope) -> None:
    first = await reserve_copy(store, scope, "h1")
    second = await reserve_copy(store, scope, "h1")  # a retry of a call whose reply was lost

    assert first == second == [1, 0, AMOUNT]
    await store.batcher.call("release", _scope_keys(scope, WIN), ["h1"])  # the settle's
    assert (await store.balance(scope, WIN)).held == 0


async def test_a_tombstone_expires_with_its_ttl_and_frees_nothing(
    store: RedisBudgetStore, scope: Scope
) -> None:
    assert (await reserve_copy(store, scope, "other"))[0] == 1
    await release_unknown(store, scope, "h1", 50)
    await asyncio.sleep(0.1)

    assert (await store.balance(scope, WIN)).held == AMOUNT  # the purge took nothing off
    amounts = _scope_keys(scope, WIN)[3]
    assert await store.client.hkeys(amounts) == [b"other"]  # the tombstone is gone


async def test_a_reserve_that_failed_is_released_once_redis_answers(
    stopped_redis: RedisProcess, scope: Scope, tmp_path: Path
) -> None:
    # redis is tried again once per minute, or as soon as the journal's replay reaches it
    store = RedisBudgetStore(
        redis_client(stopped_redis.url, 8), str(tmp_path / "journal.db"), probe_interval=60
    )
    await store.open()
    try:
        with pytest.raises(StoreUnavailable):
            await store.reserve([(scope, WIN)], AMOUNT, TTL_MS / 1000)
        with pytest.raises(StoreUnavailable):  # at once: redis is not asked again so soon
            await store.reserve([(scope, WIN)], AMOUNT, TTL_MS / 1000)
        (entry,) = await store.journal.read()
        assert (entry.script, entry.args[1], entry.moves) == ("release", TTL_MS, [])

        stopped_redis.start()
        assert await store.replay() == 1
        late = await reserve_copy(store, scope, entry.args[0])  # had the call still been queued

        assert late[0] == 0
        assert (await store.balance(scope, WIN)).held == 0
        assert len(await store.reserve([(scope, WIN)], AMOUNT, TTL_MS / 1000)) == 1
    finally:
        await store.close()


async def test_releases_waiting_in_the_journal_are_no_spend(
    stopped_redis: RedisProcess, scope: Scope, tmp_path: Path
) -> None:
    journal = str(tmp_path / "journal.db")
    store = RedisBudgetStore(
        redis_client(stopped_redis.url, 8), journal, fail_open=True, probe_interval=60
    )
    await store.open()
    try:
        holds = [await store.reserve([(scope, WIN)], AMOUNT, 60.0) for _ in range(2)]
        assert store.journal.pending == 1  # the first tried redis; the second did not

        assert [h[0].local for h in holds] == [True, True]
        assert [h[0].spent for h in holds] == [0, 0]
    finally:
        await store.close()


async def test_usage_records_read_back_as_written(store: RedisBudgetStore) -> None:
    customer = "c_" + os.urandom(6).hex()
    record = UsageRecord(
        id="u_" + os.urandom(6).hex(), time=time.time(), request_id="req_1", key_id="k1",
        customer=customer, refs_tried=("fc:a/b", "fc:c/d"), ref_used="fc:c/d", status=200,
        latency_ms=12.5, fallback=True,
    )  # fmt: skip
    await store.write_usage([Finished(record, Charge(record.id + ":final", 7, 3, 4))])

    (mine,) = await store.usage(customer, None, None)
    assert mine == replace(record, cost=7, prompt_tokens=3, completion_tokens=4)
    assert mine in await store.usage(None, None, None)
