"""Stores behind small protocols (see `base`): memory, sqlite (the embedded default), redis.

`open_stores` builds what a serving sidecar uses, for the backend that `storage.backend` names:
idempotency, budgets and usage, rate limits, closed together by `Stores.close()`; with redis
the three share one connection pool (redis_pool). `open_store` (idempotency) and
`open_budget_store` (budgets and usage) open one of them alone, each with its own redis pool.
The backend modules are imported only when chosen, so `redis` is needed only by a
redis-backed sidecar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.settings import ConfigError
from sidecar.settings.model import Storage
from sidecar.stores.base import Claim, ClaimState, IdempotencyStore, Store, StoreUnavailable
from sidecar.stores.budget import BudgetStore
from sidecar.stores.ratelimit_base import RateLimiter
from sidecar.stores.ratelimit_memory import MemoryLimiter

if TYPE_CHECKING:
    from redis.asyncio import ConnectionPool, Redis

    from sidecar.stores.budget_redis import RedisBudgetStore

__all__ = [
    "Claim",
    "ClaimState",
    "IdempotencyStore",
    "Store",
    "StoreUnavailable",
    "Stores",
    "open_budget_store",
    "open_store",
    "open_stores",
]


@dataclass(slots=True)
class Stores:
    """What a serving sidecar keeps: idempotency claims, budgets and usage, rate limits."""

    idempotency: Store
    budgets: BudgetStore
    limiter: RateLimiter
    redis_pool: ConnectionPool | None = None  # the one pool the three share (redis backend)

    async def close(self) -> None:
        """Closes the three (each waits for its queued writes), then the redis pool. Usage
        records still queued elsewhere (addons/usage) must be written before this."""
        try:
            await self.budgets.close()
            await self.limiter.close()
            await self.idempotency.close()
        finally:
            if self.redis_pool is not None:
                await self.redis_pool.aclose()


async def open_stores(storage: Storage, workers: int = 1) -> Stores:
    """The stores of `storage.backend`, opened; `workers` sidecar processes share them (the
    sqlite file then holds the rate limits too). Close them with `await stores.close()`."""
    if storage.backend != "redis":
        idempotency = await open_store(storage)
        try:
            budgets = await open_budget_store(storage)
        except BaseException:
            await idempotency.close()
            raise
        return Stores(idempotency, budgets, _local_limiter(storage, workers))
    from redis.asyncio import Redis

    from sidecar.stores.redis_pool import redis_pool

    pool = redis_pool(storage.redis_url, storage.redis_max_connections)
    client = Redis(connection_pool=pool)  # closing it leaves the pool open: Stores.close does
    budgets = _redis_budgets(client, storage)
    try:
        await budgets.open()
    except BaseException:
        await pool.aclose()
        raise
    return Stores(_redis_store(client), budgets, _redis_limiter(client), pool)


def _redis_store(client: Redis) -> Store:
    from sidecar.stores.idempotency_redis import RedisStore

    return RedisStore(client)


def _redis_budgets(client: Redis, storage: Storage) -> RedisBudgetStore:
    from sidecar.stores.budget_redis import RedisBudgetStore

    return RedisBudgetStore(
        client,
        storage.journal_path,
        storage.fail_open,
        storage.usage_retention_days,
        leases=storage.budget_leases,
        lease_slice=storage.budget_lease_slice,
        lease_idle=storage.budget_lease_idle,
        ttl=storage.reservation_ttl,
    )


def _redis_limiter(client: Redis) -> RateLimiter:
    from sidecar.stores.ratelimit_redis import RedisLimiter

    return RedisLimiter(client)


def _local_limiter(storage: Storage, workers: int) -> RateLimiter:
    """Without redis: the sqlite file when several workers share it; else in this process."""
    if storage.backend == "sqlite" and workers > 1:
        from sidecar.stores.ratelimit_sqlite import SqliteLimiter

        return SqliteLimiter(storage.sqlite_path)
    return MemoryLimiter()


async def open_store(storage: Storage) -> Store:
    """The configured backend, ready to use; close it with `await store.close()`."""
    if storage.backend == "memory":
        from sidecar.stores.idempotency_memory import MemoryStore

        return MemoryStore()
    if storage.backend == "sqlite":
        import sqlite3

        from sidecar.stores.idempotency_sqlite import SqliteStore

        try:
            return await SqliteStore.open(storage.sqlite_path)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(
                [f"storage.sqlite_path: cannot open {storage.sqlite_path}: {exc}"]
            ) from None
    if storage.backend == "redis":
        from sidecar.stores.redis_pool import redis_client

        return _redis_store(redis_client(storage.redis_url, storage.redis_max_connections))
    raise ValueError(f"storage.backend: unknown backend {storage.backend!r}")


async def open_budget_store(storage: Storage, serve: bool = True) -> BudgetStore:
    """The budget and usage backend that `storage.backend` names, opened (redis lazily: a
    sidecar starts while redis is down, and replays its journal once redis answers).
    `serve=False` (a reader such as `usage export`) leaves the redis journal alone."""
    if storage.backend == "memory":
        from sidecar.stores.budget_memory import MemoryBudgetStore

        return MemoryBudgetStore()
    if storage.backend == "sqlite":
        from sidecar.stores.budget_sqlite import SqliteBudgetStore

        store = SqliteBudgetStore(
            storage.sqlite_path,
            storage.usage_retention_days,
            leases=storage.budget_leases and serve,  # a reader (usage export) takes none
            lease_slice=storage.budget_lease_slice,
            lease_idle=storage.budget_lease_idle,
            ttl=storage.reservation_ttl,
        )
        try:
            await store.open()
        except (StoreUnavailable, OSError) as exc:
            await store.close()
            message = f"storage.sqlite_path: cannot open {storage.sqlite_path}: {exc}"
            raise ConfigError([message]) from None
        return store
    if storage.backend == "redis":
        from sidecar.stores.redis_pool import redis_client

        client = redis_client(storage.redis_url, storage.redis_max_connections)
        shared = _redis_budgets(client, storage)
        if serve:
            await shared.open()
        return shared
    raise ValueError(f"storage.backend: unknown backend {storage.backend!r}")
