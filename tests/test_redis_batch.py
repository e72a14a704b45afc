"""The script batcher's own round trip (hiredis-packed EVALSHAs on a pooled connection, not
redis-py's Pipeline): replies in call order, an error reply failing only its own call, a
script's first call loaded in the same write, a flushed script cache reloaded, and a stale
connection retried once on a new one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sidecar.stores.redis_batch import ScriptBatcher
from sidecar.stores.redis_pool import redis_client
from tests.procs import RedisProcess

pytestmark = pytest.mark.redis

ECHO = "return {KEYS[1], ARGV[1], ARGV[2]}"
INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
FAIL = "return redis.error_reply('nope')"


@pytest.fixture
async def client(redis_server: RedisProcess) -> AsyncIterator[Redis]:
    found = redis_client(redis_server.url, 64)
    yield found
    await found.aclose()


def batcher_of(client: Redis, timeout: float | None = None) -> ScriptBatcher:
    scripts = {name: client.register_script(body) for name, body in
               (("echo", ECHO), ("incr", INCR), ("fail", FAIL))}  # fmt: skip
    return ScriptBatcher(client, scripts, timeout)


async def test_calls_of_one_turn_leave_in_one_write_and_answer_in_order(client: Redis) -> None:
    batcher = batcher_of(client)
    calls = [batcher.call("echo", ["k"], [n, 1.5]) for n in range(50)]
    replies = await asyncio.gather(*calls)
    assert replies == [[b"k", str(n).encode(), b"1.5"] for n in range(50)]
    await batcher.drain()


async def test_an_error_reply_fails_its_own_call_only(client: Redis) -> None:
    batcher = batcher_of(client)
    key = f"batch:{id(batcher)}"
    first, failed, last = (
        batcher.call("incr", [key], [2]),
        batcher.call("fail", [], []),
        (batcher.call("incr", [key], [3])),
    )
    assert await first == 2
    with pytest.raises(ResponseError, match="nope"):
        await failed
    assert await last == 5
    await batcher.drain()


def noscript_errors(admin: redis.Redis) -> int:
    return int(admin.info("errorstats").get("errorstat_NOSCRIPT", {}).get("count", 0))


async def test_a_scripts_first_call_is_loaded_in_the_same_write_not_refused(
    client: Redis, redis_server: RedisProcess
) -> None:
    """On an empty script cache a first call is not a NOSCRIPT resent a round trip later,
    after whatever was sent meanwhile: its SCRIPT LOAD leads the same write."""
    with redis.Redis.from_url(redis_server.url) as admin:
        admin.script_flush()
        before = noscript_errors(admin)
        batcher = batcher_of(client)
        key = f"first:{id(batcher)}"
        assert await asyncio.gather(*(batcher.call("incr", [key], [1]) for _ in range(3))) == [
            1, 2, 3,
        ]  # fmt: skip
        assert noscript_errors(admin) == before
    await batcher.drain()


async def test_a_flushed_script_cache_is_reloaded_and_the_calls_resent(
    client: Redis, redis_server: RedisProcess
) -> None:
    batcher = batcher_of(client)
    assert await batcher.call("echo", ["a"], ["b", "c"]) == [b"a", b"b", b"c"]
    redis.Redis.from_url(redis_server.url).script_flush()
    assert await batcher.call("echo", ["a"], ["b", "c"]) == [b"a", b"b", b"c"]
    await batcher.drain()


async def test_a_connection_cut_by_the_server_is_retried_once_on_a_new_one(
    client: Redis, redis_server: RedisProcess
) -> None:
    batcher = batcher_of(client)
    assert await batcher.call("echo", ["a"], [1, 2]) == [b"a", b"1", b"2"]
    with redis.Redis.from_url(redis_server.url) as admin:
        admin.client_kill_filter(_type="normal", skipme=True)
    assert await batcher.call("echo", ["a"], [3, 4]) == [b"a", b"3", b"4"]
    await batcher.drain()


async def test_drain_gives_the_kept_connection_back_to_the_pool(client: Redis) -> None:
    batcher = batcher_of(client)
    await batcher.call("echo", ["a"], [1, 2])
    pool = client.connection_pool
    assert len(pool._in_use_connections) == 1  # kept between round trips
    await batcher.drain()
    assert len(pool._in_use_connections) == 0
