"""Idempotency claims and stored answers in the shared store, Redis, for many sidecars or
gateway replicas.

Every operation that reads and then writes is one Lua script, so it is atomic on the server
however many processes share it. Scripts are registered once per store and run by SHA
(EVALSHA, loaded again automatically after a server restart). Keys carry a hash tag
(`ringside:{idem:<scope>}:<key>`), so everything of one scope lives in one Redis Cluster slot.
This module is imported only when `storage.backend` is `redis`.
"""

from __future__ import annotations

import os
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sidecar.stores.base import Claim, ClaimState, StoreUnavailable

_BEGIN = """
local found = redis.call('HMGET', KEYS[1], 'f', 't', 'r')
if not found[1] then
  redis.call('HSET', KEYS[1], 'f', ARGV[1], 't', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'owned'}
end
if found[1] ~= ARGV[1] then return {'conflict'} end
if found[3] then return {'done', found[3]} end
return {'running'}
"""

_EXTEND = """
if redis.call('HGET', KEYS[1], 't') == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_COMPLETE = """
if redis.call('HGET', KEYS[1], 't') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 't')
  redis.call('HSET', KEYS[1], 'r', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('HGET', KEYS[1], 't') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisIdempotency:
    def __init__(self, client: aioredis.Redis) -> None:
        self._begin = client.register_script(_BEGIN)
        self._extend = client.register_script(_EXTEND)
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)

    @staticmethod
    def key(scope: str, key: str) -> str:
        return f"ringside:{{idem:{scope}}}:{key}"

    async def _call(self, script: Any, key: str, *args: Any) -> Any:
        try:
            return await script(keys=[key], args=args)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def begin(self, scope: str, key: str, fingerprint: str, lease: float) -> Claim:
        token = os.urandom(16).hex()
        found = await self._call(self._begin, self.key(scope, key), fingerprint, token, _ms(lease))
        state = found[0].decode()
        if state == "owned":
            return Claim(ClaimState.OWNED, token=token)
        if state == "done":
            return Claim(ClaimState.DONE, record=bytes(found[1]))
        return Claim(ClaimState(state))

    async def extend(self, scope: str, key: str, token: str, lease: float) -> bool:
        return bool(await self._call(self._extend, self.key(scope, key), token, _ms(lease)))

    async def complete(self, scope: str, key: str, token: str, record: bytes, ttl: float) -> bool:
        done = await self._call(self._complete, self.key(scope, key), token, record, _ms(ttl))
        return bool(done)

    async def release(self, scope: str, key: str, token: str) -> None:
        await self._call(self._release, self.key(scope, key), token)


class RedisStore:
    """Over `client` (see redis_pool); `close()` closes the client, which closes its pool only
    if the client owns it (`Redis.from_pool`), not a pool shared with other stores."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.idempotency = RedisIdempotency(self.client)

    async def close(self) -> None:
        await self.client.aclose()
