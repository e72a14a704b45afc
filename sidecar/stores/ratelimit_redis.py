"""The shared rate limiter: GCRA cells in Redis, one atomic Lua script per request.

All replicas that share the Redis see one state, so a limit is exact however many of them
there are: `acquire` is a single EVALSHA (script registered once, reloaded by redis-py after a
server restart) that reads every cell of the request, decides, and writes them all or none.
Time is the Redis server's (`TIME`), so the replicas' clocks do not matter. A cell's key
expires when the cell is full again, so idle callers cost no memory.

Keys: `ringside:{rl}:<scope>:<kind>:<who>`. The one hash tag puts every limiter key in the same
Redis Cluster slot, which a multi-key script needs (a request checks cells of several callers
at once); the price is that the limiter's load is on one shard.

With Redis unreachable the limiter fails open as far as the shared state goes: it limits in
this process alone (the in-process limiter, same rules) and logs a warning (once per outage,
sidecar/outage.py), so each replica still holds a caller to the configured limits while the
replicas together may admit up to `replicas ×` them. After a failure Redis is retried once
per OUTAGE_RETRY_SECONDS, so an outage never costs every request a timeout. Requests are never
refused because Redis is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sidecar.outage import Outage
from sidecar.stores.ratelimit_base import PERIOD, Cell, Verdict
from sidecar.stores.ratelimit_memory import MemoryLimiter
from sidecar.stores.redis_batch import ScriptBatcher

log = logging.getLogger("ringside")

TIMEOUT_SECONDS = 0.5  # a call, retry included: a limiter that waits longer is worse than none
OUTAGE_RETRY_SECONDS = 1.0
ACQUIRED_LOCALLY = "requests limited in this process alone"
ADJUSTED_LOCALLY = "token adjustments made in this process alone"
KEY_PREFIX = "ringside:{rl}:"

# Time in microseconds since 2023-11-14 (a smaller number than since 1970 keeps sub-microsecond
# precision in Lua's doubles). TATs are stored with %.17g, which round-trips a double exactly.
# `tat_of(key)`: a cell's TAT, never earlier than now (a full cell has no key).
_NOW = """
local clock = redis.call('TIME')
local now = (tonumber(clock[1]) - 1700000000) * 1000000 + tonumber(clock[2])
local function tat_of(key)
  local stored = tonumber(redis.call('GET', key))
  if stored and stored > now then return stored end
  return now
end
"""

_ACQUIRE = (
    _NOW
    + """
local period = tonumber(ARGV[1])
local n = #KEYS
local olds, news = {}, {}
local refused, worst = 0, 0
for i = 1, n do
  local interval = tonumber(ARGV[2 * i])
  local tat = tat_of(KEYS[i])
  local new = tat + tonumber(ARGV[2 * i + 1]) * interval
  local over = new - now - period - math.min(interval / 2, 1000)
  if over > worst then refused, worst = i, over end
  olds[i], news[i] = tat, new
end
local reply = {0, refused, math.ceil(worst)}
if refused > 0 then
  for i = 1, n do reply[3 + i] = math.floor(olds[i] - now) end
  return reply
end
reply[1] = 1
for i = 1, n do
  local ahead = news[i] - now
  redis.call('SET', KEYS[i], string.format('%.17g', news[i]), 'PX', math.ceil(ahead / 1000) + 1000)
  reply[3 + i] = math.floor(ahead)
end
return reply
"""
)

_ADJUST = (
    _NOW
    + """
for i = 1, #KEYS do
  local new = tat_of(KEYS[i]) + tonumber(ARGV[i])
  if new > now then
    local ttl = math.ceil((new - now) / 1000) + 1000
    redis.call('SET', KEYS[i], string.format('%.17g', new), 'PX', ttl)
  else
    redis.call('DEL', KEYS[i])
  end
end
return #KEYS
"""
)


class RedisLimiter:
    def __init__(self, client: aioredis.Redis, fallback: MemoryLimiter | None = None) -> None:
        self.client = client  # closed by close(); its pool too if it owns it (redis_pool)
        self.batcher = ScriptBatcher(
            self.client,
            {
                "acquire": self.client.register_script(_ACQUIRE),
                "adjust": self.client.register_script(_ADJUST),
            },
            timeout=TIMEOUT_SECONDS,  # shorter than the pool's: per call, on its connections
        )
        self.fallback = fallback or MemoryLimiter()
        self._down_until = 0.0
        self.outage = Outage("ratelimit")  # its metrics: set by the RateLimits addon

    async def acquire(self, cells: Sequence[Cell]) -> Verdict:
        if time.monotonic() < self._down_until:
            self.outage.failed("acquire", ACQUIRED_LOCALLY, "redis unreachable")
            return self.fallback.check(cells)
        args: list[float] = [PERIOD * 1e6]
        for cell in cells:
            args.append(cell.interval * 1e6)
            args.append(cell.cost)
        try:
            reply = await self.batcher.call(
                "acquire", [KEY_PREFIX + cell.key for cell in cells], args
            )
        except (RedisError, OSError) as exc:
            self._outage("acquire", ACQUIRED_LOCALLY, exc)
            return self.fallback.check(cells)
        if self.outage.down:
            self._down_until = 0.0
            self.outage.answered()
        admitted, refused, wait_us = reply[0], reply[1], reply[2]
        backlogs = [max(0, ahead) / 1e6 for ahead in reply[3:]]
        return Verdict(bool(admitted), backlogs, int(refused) - 1, int(wait_us) / 1e6)

    def adjust(self, shifts: Sequence[tuple[str, float]]) -> None:
        if time.monotonic() < self._down_until:
            self.outage.failed("adjust", ADJUSTED_LOCALLY, "redis unreachable")
            self.fallback.adjust(shifts)
            return
        sent = self.batcher.call(
            "adjust", [KEY_PREFIX + key for key, _ in shifts], [s * 1e6 for _, s in shifts]
        )
        sent.add_done_callback(lambda done: self._adjusted(done, shifts))

    def _adjusted(self, sent: asyncio.Future[object], shifts: Sequence[tuple[str, float]]) -> None:
        exc = sent.exception()
        if isinstance(exc, (RedisError, OSError)):
            self._outage("adjust", ADJUSTED_LOCALLY, exc)
            self.fallback.adjust(shifts)
        elif exc is not None:
            log.error("rate limits: adjusting %d cells failed: %s", len(shifts), exc)

    def _outage(self, operation: str, effect: str, exc: BaseException) -> None:
        self._down_until = time.monotonic() + OUTAGE_RETRY_SECONDS
        self.outage.failed(operation, effect, f"redis unreachable ({exc})")

    async def close(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.batcher.drain(), 2.0)
        await self.client.aclose()
