"""One suite for every store backend: memory, sqlite (a file in tmp_path), redis (a private
redis-server). Each test uses its own scope, so the session's redis-server needs no flushing."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.settings.model import Storage
from sidecar.stores import Claim, ClaimState, Store, StoreUnavailable, open_store
from sidecar.stores.idempotency_redis import RedisStore
from tests.procs import RedisProcess, free_port

FINGERPRINT = "f" * 64
OTHER_FINGERPRINT = "0" * 64
LEASE = 30.0
TTL = 3600.0


@pytest.fixture(params=["memory", "sqlite", "redis"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "redis":
        redis_server = request.getfixturevalue("redis_server")
        return Storage(backend="redis", redis_url=redis_server.url)
    return Storage(backend=request.param, sqlite_path=str(tmp_path / "ringside.db"))


@pytest.fixture
async def store(storage: Storage) -> AsyncIterator[Store]:
    opened = await open_store(storage)
    yield opened
    await opened.close()


@pytest.fixture
def scope() -> str:
    return "key_" + os.urandom(6).hex()


async def owned(store: Store, scope: str, key: str = "k1", lease: float = LEASE) -> Claim:
    claim = await store.idempotency.begin(scope, key, FINGERPRINT, lease)
    assert claim.state is ClaimState.OWNED and claim.token
    return claim


async def test_the_first_begin_owns_the_key(store: Store, scope: str) -> None:
    claim = await store.idempotency.begin(scope, "k1", FINGERPRINT, LEASE)
    assert claim.state is ClaimState.OWNED
    assert claim.record is None


async def test_a_repeat_while_the_first_runs_is_told_it_is_running(
    store: Store, scope: str
) -> None:
    await owned(store, scope)
    again = await store.idempotency.begin(scope, "k1", FINGERPRINT, LEASE)
    assert again == Claim(ClaimState.RUNNING)


async def test_a_completed_key_replays_its_record(store: Store, scope: str) -> None:
    claim = await owned(store, scope)
    assert await store.idempotency.complete(scope, "k1", claim.token, b"answer", TTL)
    again = await store.idempotency.begin(scope, "k1", FINGERPRINT, LEASE)
    assert again == Claim(ClaimState.DONE, record=b"answer")


async def test_records_keep_every_byte(store: Store, scope: str) -> None:
    record = bytes(range(256)) * 4 + b"\n\x00tail"
    claim = await owned(store, scope)
    await store.idempotency.complete(scope, "k1", claim.token, record, TTL)
    again = await store.idempotency.begin(scope, "k1", FINGERPRINT, LEASE)
    assert again.record == record


async def test_a_different_fingerprint_conflicts_while_running(store: Store, scope: str) -> None:
    await owned(store, scope)
    other = await store.idempotency.begin(scope, "k1", OTHER_FINGERPRINT, LEASE)
    assert other == Claim(ClaimState.CONFLICT)


async def test_a_different_fingerprint_conflicts_once_completed(store: Store, scope: str) -> None:
    claim = await owned(store, scope)
    await store.idempotency.complete(scope, "k1", claim.token, b"answer", TTL)
    other = await store.idempotency.begin(scope, "k1", OTHER_FINGERPRINT, LEASE)
    assert other == Claim(ClaimState.CONFLICT)


async def test_a_released_key_can_be_taken_again(store: Store, scope: str) -> None:
    claim = await owned(store, scope)
    await store.idempotency.release(scope, "k1", claim.token)
    again = await store.idempotency.begin(scope, "k1", OTHER_FINGERPRINT, LEASE)
    assert again.state is ClaimState.OWNED
    assert again.token != claim.token


async def test_only_the_owner_token_completes_or_releases(store: Store, scope: str) -> None:
    await owned(store, scope)
    assert not await store.idempotency.complete(scope, "k1", "not-the-token", b"answer", TTL)
    await store.idempotency.release(scope, "k1", "not-the-token")
    still = await store.idempotency.begin(scope, "k1", FINGERPRINT, LEASE)
    assert still == Claim(ClaimState.RUNNING)


async def test_a_completed_record_is_never_overwritten(store: Store, scope: str) -> None:
    claim = await owned(store, scope)
    await store.idempotency.complete(scope, "k1", claim.token, b"first", TTL)
    assert not await store.idempotency.complete(scope, "k1", claim.token, b"second", TTL)
    await store.idempotency.release(scope, "k1", claim.token)
    again = await store.idempotency.begin(scope, "k1", FINGERPRINT, LEASE)
    assert again == Claim(ClaimState.DONE, record=b"first")


async def test_keys_are_scoped(store: Store, scope: str) -> None:
    await owned(store, scope)
    elsewhere = await store.idempotency.begin(scope + "_other", "k1", OTHER_FINGERPRINT, LEASE)
    assert elsewhere.state is ClaimState.OWNED


async def test_only_one_of_many_concurrent_begins_owns_the_key(store: Store, scope: str) -> None:
    claims = await asyncio.gather(
        *(store.idempotency.begin(scope, "k1", FINGERPRINT, LEASE) for _ in range(20))
    )
    states = [claim.state for claim in claims]
    assert states.count(ClaimState.OWNED) == 1
    assert states.count(ClaimState.RUNNING) == 19


async def test_a_pending_key_expires_after_its_lease(store: Store, scope: str) -> None:
    stale = await owned(store, scope, lease=0.2)
    await asyncio.sleep(0.35)
    fresh = await store.idempotency.begin(scope, "k1", OTHER_FINGERPRINT, LEASE)
    assert fresh.state is ClaimState.OWNED
    assert not await store.idempotency.complete(scope, "k1", stale.token, b"late", TTL)


async def test_extending_the_lease_keeps_the_key(store: Store, scope: str) -> None:
    claim = await owned(store, scope, lease=0.3)
    await asyncio.sleep(0.15)
    assert await store.idempotency.extend(scope, "k1", claim.token, 1.0)
    await asyncio.sleep(0.3)
    still = await store.idempotency.begin(scope, "k1", FINGERPRINT, LEASE)
    assert still == Claim(ClaimState.RUNNING)


async def test_a_stranger_cannot_extend_the_lease(store: Store, scope: str) -> None:
    await owned(store, scope)
    assert not await store.idempotency.extend(scope, "k1", "not-the-token", LEASE)


async def test_a_completed_record_expires_after_its_ttl(store: Store, scope: str) -> None:
    claim = await owned(store, scope)
    await store.idempotency.complete(scope, "k1", claim.token, b"answer", 0.2)
    await asyncio.sleep(0.35)
    again = await store.idempotency.begin(scope, "k1", OTHER_FINGERPRINT, LEASE)
    assert again.state is ClaimState.OWNED


async def test_sqlite_records_survive_reopening_the_file(tmp_path: Path) -> None:
    storage = Storage(backend="sqlite", sqlite_path=str(tmp_path / "ringside.db"))
    first = await open_store(storage)
    claim = await first.idempotency.begin("app1", "k1", FINGERPRINT, LEASE)
    await first.idempotency.complete("app1", "k1", claim.token, b"answer", TTL)
    await first.close()
    second = await open_store(storage)
    try:
        again = await second.idempotency.begin("app1", "k1", FINGERPRINT, LEASE)
    finally:
        await second.close()
    assert again == Claim(ClaimState.DONE, record=b"answer")


async def test_sqlite_creates_the_directory_of_its_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "nested" / "ringside.db"
    store = await open_store(Storage(backend="sqlite", sqlite_path=str(path)))
    await store.close()
    assert path.exists()


@pytest.mark.redis
async def test_redis_stores_share_keys_between_clients(
    redis_server: RedisProcess, scope: str
) -> None:
    storage = Storage(backend="redis", redis_url=redis_server.url)
    one, two = await open_store(storage), await open_store(storage)
    try:
        await owned(one, scope)
        seen = await two.idempotency.begin(scope, "k1", FINGERPRINT, LEASE)
    finally:
        await one.close()
        await two.close()
    assert seen == Claim(ClaimState.RUNNING)


@pytest.mark.redis
async def test_redis_keys_carry_a_cluster_hash_tag(redis_server: RedisProcess, scope: str) -> None:
    storage = Storage(backend="redis", redis_url=redis_server.url)
    store = await open_store(storage)
    assert isinstance(store, RedisStore)
    try:
        await owned(store, scope, key="order-17")
        keys = await store.client.keys(f"ringside:*{scope}*")
    finally:
        await store.close()
    assert keys == [f"ringside:{{idem:{scope}}}:order-17".encode()]


async def test_an_unreachable_redis_raises_store_unavailable() -> None:
    storage = Storage(backend="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    store = await open_store(storage)
    try:
        with pytest.raises(StoreUnavailable):
            await store.idempotency.begin("app1", "k1", FINGERPRINT, LEASE)
    finally:
        await store.close()
