"""With the redis backend a sidecar holds one connection pool, shared by its idempotency,
budget and rate-limit stores (issue 18), and closing the sidecar closes it: every connection
it made to redis is gone. The rate limiter keeps its shorter patience on that pool."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from sidecar.settings.model import Storage
from sidecar.stores import open_stores
from sidecar.stores.ratelimit_base import REQUESTS, Cell
from sidecar.stores.ratelimit_redis import TIMEOUT_SECONDS
from sidecar.stores.redis_pool import COMMAND_TIMEOUT
from tests.inprocess import api_client
from tests.procs import RedisProcess

HELLO = [{"role": "user", "content": "hi"}]


def redis_config(url: str, journal: Path) -> dict[str, Any]:
    """The mock provider, with every store in use: a customer budget, rate limits, and
    idempotency keys (sent by the test)."""
    return {
        "listen": {"api": "127.0.0.1:8787", "admin": "127.0.0.1:8788"},
        "storage": {"backend": "redis", "redis_url": url, "journal_path": str(journal)},
        "providers": {"mock": {"kind": "mock", "mock": {"default": {"content": "pooled"}}}},
        "models": {"fc:mock/echo": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}},
        "customers": {"acme": {"budget": {"usd": 100.0, "period": "day"}}},
        "rate_limits": {"ip": {"rpm": 100_000}, "customer": {"rpm": 100_000}},
    }


def ringside_connections(server: RedisProcess) -> list[dict[str, Any]]:
    """The connections redis sees from sidecars (named `ringside`), not the test's own."""
    with redis.Redis(port=server.port) as admin:
        return [c for c in admin.client_list() if c.get("name") == "ringside"]


@pytest.mark.redis
async def test_the_three_stores_share_one_pool_and_closing_closes_it(
    redis_server: RedisProcess, tmp_path: Path
) -> None:
    assert ringside_connections(redis_server) == []
    config = redis_config(redis_server.url, tmp_path / "journal.db")
    async with api_client(tmp_path, config) as (client, state):
        services = state.holder.current.services
        clients = [services.store.client, services.budgets.client, services.limiter.client]
        assert len({id(each.connection_pool) for each in clients}) == 1

        async def chat(n: int) -> int:
            headers = {"FC-Customer": "acme", "Idempotency-Key": f"pool-{tmp_path.name}-{n}"}
            body = {"model": "fc:mock/echo", "messages": HELLO}
            answer = await client.post("/v1/chat/completions", json=body, headers=headers)
            await answer.read()
            return answer.status

        assert await asyncio.gather(*(chat(n) for n in range(40))) == [200] * 40
        pool = clients[0].connection_pool
        held = ringside_connections(redis_server)
        assert 0 < len(held) <= len(pool._available_connections) + len(pool._in_use_connections)
    assert ringside_connections(redis_server) == []


async def test_the_limiter_waits_less_than_the_pool_for_a_silent_redis() -> None:
    """The pool gives a reply 2 s; the limiter, on the same pool, gives up after 0.5 s and
    limits in process (a server that accepts and never answers: no refusal to act on)."""
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    stores = await open_stores(Storage(backend="redis", redis_url=f"redis://127.0.0.1:{port}/0"))
    try:
        started = time.monotonic()
        verdict = await stores.limiter.acquire([Cell("ip:requests:silent", "ip", REQUESTS, 60, 1)])
        waited = time.monotonic() - started
    finally:
        await stores.close()
        silent.close()
    assert verdict.admitted
    assert TIMEOUT_SECONDS <= waited < COMMAND_TIMEOUT


@pytest.mark.redis
async def test_a_burst_waits_for_the_capped_pool_instead_of_opening_a_connection_each(
    redis_server: RedisProcess, tmp_path: Path
) -> None:
    """storage.redis_max_connections bounds what one sidecar opens: 60 requests at once, each
    with a budget, an idempotency key and rate limits, through 2 connections, all answered."""
    config = redis_config(redis_server.url, tmp_path / "journal.db")
    config["storage"]["redis_max_connections"] = 2
    async with api_client(tmp_path, config) as (client, _state):

        async def chat(n: int) -> int:
            headers = {"FC-Customer": "acme", "Idempotency-Key": f"cap-{tmp_path.name}-{n}"}
            body = {"model": "fc:mock/echo", "messages": HELLO}
            answer = await client.post("/v1/chat/completions", json=body, headers=headers)
            await answer.read()
            return answer.status

        most = 0

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, len(ringside_connections(redis_server)))
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        try:
            assert await asyncio.gather(*(chat(n) for n in range(60))) == [200] * 60
        finally:
            watcher.cancel()
        assert 0 < most <= 2
        assert len(ringside_connections(redis_server)) <= 2
