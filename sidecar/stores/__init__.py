"""Stores behind small protocols (see `base`): memory, sqlite (the embedded default), redis.

`open_store` (idempotency) and `open_budget_store` (budgets and usage) build the backend that
`storage.backend` names; the backend modules are imported only when chosen, so `redis` is needed
only by a redis-backed sidecar.
"""

from __future__ import annotations

from sidecar.settings import ConfigError
from sidecar.settings.model import Storage
from sidecar.stores.base import Claim, ClaimState, IdempotencyStore, Store, StoreUnavailable
from sidecar.stores.budget import BudgetStore

__all__ = [
    "Claim",
    "ClaimState",
    "IdempotencyStore",
    "Store",
    "StoreUnavailable",
    "open_budget_store",
    "open_store",
]


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
        from sidecar.stores.idempotency_redis import RedisStore

        return RedisStore(storage.redis_url)
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

        store = SqliteBudgetStore(storage.sqlite_path, storage.usage_retention_days)
        try:
            await store.open()
        except (StoreUnavailable, OSError) as exc:
            await store.close()
            message = f"storage.sqlite_path: cannot open {storage.sqlite_path}: {exc}"
            raise ConfigError([message]) from None
        return store
    if storage.backend == "redis":
        from sidecar.stores.budget_redis import RedisBudgetStore

        shared = RedisBudgetStore(
            storage.redis_url, storage.journal_path, storage.fail_open,
            storage.usage_retention_days,
        )  # fmt: skip
        if serve:
            await shared.open()
        return shared
    raise ValueError(f"storage.backend: unknown backend {storage.backend!r}")
