"""Stores behind small protocols (see `base`): memory, sqlite (the embedded default), redis.

`open_store` builds the backend that `storage.backend` names; the backend modules are
imported only when chosen, so `redis` is needed only by a redis-backed sidecar.
"""

from __future__ import annotations

from sidecar.settings import ConfigError
from sidecar.settings.model import Storage
from sidecar.stores.base import Claim, ClaimState, IdempotencyStore, Store, StoreUnavailable

__all__ = [
    "Claim",
    "ClaimState",
    "IdempotencyStore",
    "Store",
    "StoreUnavailable",
    "open_store",
]


async def open_store(storage: Storage) -> Store:
    """The configured backend, ready to use; close it with `await store.close()`."""
    if storage.backend == "memory":
        from sidecar.stores.memory import MemoryStore

        return MemoryStore()
    if storage.backend == "sqlite":
        import sqlite3

        from sidecar.stores.sqlite import SqliteStore

        try:
            return await SqliteStore.open(storage.sqlite_path)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(
                [f"storage.sqlite_path: cannot open {storage.sqlite_path}: {exc}"]
            ) from None
    if storage.backend == "redis":
        from sidecar.stores.redis import RedisStore

        return RedisStore(storage.redis_url)
    raise ValueError(f"storage.backend: unknown backend {storage.backend!r}")
