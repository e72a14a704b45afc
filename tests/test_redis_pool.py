"""With the redis backend a sidecar holds one connection pool, shared by its idempotency,
budget and rate-limit stores (issue 18), and closing the sidecar closes it: every connection
it made to redis is gone."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.inprocess import api_client
from tests.procs import RedisProcess

pytestmark = pytest.mark.redis

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
