"""Idempotency claims and stored answers, in process: nothing survives a restart and nothing
is shared between processes.

Every operation runs without an `await` between its read and its write, so on one event
loop each is atomic without a lock.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.stores.base import Claim, ClaimState

PURGE_EVERY = 60.0  # seconds between sweeps of expired entries


@dataclass(slots=True)
class _Entry:
    fingerprint: str
    token: str  # "" once completed
    record: bytes | None
    expires_at: float


class MemoryIdempotency:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._next_purge = clock() + PURGE_EVERY

    def _live(self, scope: str, key: str, now: float) -> _Entry | None:
        entry = self._entries.get((scope, key))
        if entry is not None and entry.expires_at <= now:
            del self._entries[(scope, key)]
            return None
        return entry

    def _purge(self, now: float) -> None:
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_EVERY
        expired = [k for k, entry in self._entries.items() if entry.expires_at <= now]
        for k in expired:
            del self._entries[k]

    async def begin(self, scope: str, key: str, fingerprint: str, lease: float) -> Claim:
        now = self._clock()
        self._purge(now)
        entry = self._live(scope, key, now)
        if entry is None:
            token = os.urandom(16).hex()
            self._entries[(scope, key)] = _Entry(fingerprint, token, None, now + lease)
            return Claim(ClaimState.OWNED, token=token)
        if entry.fingerprint != fingerprint:
            return Claim(ClaimState.CONFLICT)
        if entry.record is not None:
            return Claim(ClaimState.DONE, record=entry.record)
        return Claim(ClaimState.RUNNING)

    def _owned(self, scope: str, key: str, token: str) -> _Entry | None:
        entry = self._live(scope, key, self._clock())
        return entry if entry is not None and token and entry.token == token else None

    async def extend(self, scope: str, key: str, token: str, lease: float) -> bool:
        entry = self._owned(scope, key, token)
        if entry is None:
            return False
        entry.expires_at = self._clock() + lease
        return True

    async def complete(self, scope: str, key: str, token: str, record: bytes, ttl: float) -> bool:
        entry = self._owned(scope, key, token)
        if entry is None:
            return False
        entry.token, entry.record, entry.expires_at = "", record, self._clock() + ttl
        return True

    async def release(self, scope: str, key: str, token: str) -> None:
        if self._owned(scope, key, token) is not None:
            del self._entries[(scope, key)]


class MemoryStore:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.idempotency = MemoryIdempotency(clock)

    async def close(self) -> None:
        pass
