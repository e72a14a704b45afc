"""What every store backend offers, one small protocol per feature.

A backend (`memory`, `sqlite`, `redis`) is one `Store` object per process that exposes a
feature store per attribute: `store.idempotency` now; budgets (reserve/settle with TTL'd
reservations), rate limits (GCRA) and usage records are further protocols here, added as
further attributes, each implemented atomically by every backend and run through the same
parametrized test suite. Values the stores keep for a feature are opaque bytes: encoding
belongs to the feature's addon, so one backend change never touches the wire format.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class StoreUnavailable(Exception):
    """The store could not be reached or did not answer; `storage.fail_open` decides."""


class ClaimState(enum.Enum):
    OWNED = "owned"  # the caller now runs the request: complete() or release() it with `token`
    RUNNING = "running"  # another request with this key and the same body is still running
    DONE = "done"  # the first request finished: `record` is its answer
    CONFLICT = "conflict"  # the key was first used with a different request


@dataclass(frozen=True, slots=True)
class Claim:
    """What `IdempotencyStore.begin` found (or made) under a key."""

    state: ClaimState
    token: str = ""  # only for OWNED: proves ownership to extend/complete/release
    record: bytes | None = None  # only for DONE


class IdempotencyStore(Protocol):
    """Idempotency records, each under (scope, key), each with an expiry.

    `begin` atomically either takes the key for the caller (a pending entry that lives for
    `lease` seconds unless extended, so a crashed owner frees it) or reports what is there.
    Only the owner's token can extend, complete or release an entry; a completed entry keeps
    its record for `ttl` seconds and is never overwritten before it expires.
    """

    async def begin(self, scope: str, key: str, fingerprint: str, lease: float) -> Claim: ...

    async def extend(self, scope: str, key: str, token: str, lease: float) -> bool: ...

    async def complete(
        self, scope: str, key: str, token: str, record: bytes, ttl: float
    ) -> bool: ...

    async def release(self, scope: str, key: str, token: str) -> None: ...


class Store(Protocol):
    """One backend, opened at start and closed at shutdown."""

    @property
    def idempotency(self) -> IdempotencyStore: ...

    async def close(self) -> None: ...
