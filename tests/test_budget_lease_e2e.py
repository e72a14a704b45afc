"""Budget leases end to end: real sidecars on one redis, admitting requests on their leases.
Never over the limit, spent equal to the usage records, nothing held once leases are given
back or, after a `kill -9`, expired."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import redis

from tests.conftest import PROVIDER_KEY
from tests.procs import RedisProcess, SidecarProcess, wait_until
from tests.support import CHAT
from tests.test_budget import (
    ADMIN_ENV,
    BODY,
    COST,
    assert_clean_refusals,
    budget_config,
    fire,
    nano,
    settled_usage,
    unique,
    usage_of,
)
from tests.upstreams.openai_fake import FakeOpenAI, Reply

pytestmark = pytest.mark.redis


def redis_storage(redis_server: RedisProcess, journal: str, **more: Any) -> dict[str, Any]:
    return {"backend": "redis", "redis_url": redis_server.url, "journal_path": journal, **more}


def evalsha_calls(redis_server: RedisProcess) -> int:
    stats = redis.Redis.from_url(redis_server.url).info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def leased(redis_server: RedisProcess, customer: str) -> int:
    """What the leases of sidecar processes hold in the customer's budget, as redis has it."""
    amounts = f"rs:{{cust:{customer}}}:budget:hold_amount"
    return int(redis.Redis.from_url(redis_server.url).hget(amounts, "~leased") or 0)


def held(redis_server: RedisProcess, customer: str) -> int:
    """All a customer's budget holds, of requests and of leases, as redis has them."""
    return int(
        redis.Redis.from_url(redis_server.url).get(f"rs:{{cust:{customer}}}:budget:held") or 0
    )


def spent_of_stopped(redis_server: RedisProcess, customer: str) -> float:
    """The customer's spent this month in USD, read from redis (its sidecar is stopped)."""
    client = redis.Redis.from_url(redis_server.url)
    (key,) = client.keys(f"rs:{{cust:{customer}}}:budget:spent:*")
    return int(client.get(key) or 0) / 1e9


def nothing_held(proc: SidecarProcess, customer: str, timeout: float) -> dict[str, Any]:
    return wait_until(  # type: ignore[no-any-return]
        lambda: (u := usage_of(proc, customer))["reserved_usd"] == 0 and u, timeout
    )


async def fire_all(urls: list[str], per_url: int, customer: str) -> list[int]:
    """`per_url` requests to each url, all at once (one connection each); 402s well formed."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(url: str) -> int:
            async with session.post(url + CHAT, json=BODY, headers={"FC-Customer": customer}) as r:
                data = await r.json()
                if r.status == 402:
                    assert data["error"]["code"] == "budget_exceeded", data
                return r.status

        return await asyncio.gather(*(one(url) for url in urls for _ in range(per_url)))


async def test_two_sidecars_at_200_concurrent_requests_each_never_overspend(
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    redis_server: RedisProcess,
    tmp_path: Any,
) -> None:
    fake_openai.on_model("priced", Reply(prompt_tokens=100, completion_tokens=50, delay=0.02))
    customer, rich = unique("leased"), unique("rich")
    procs = [
        sidecar_factory(
            budget_config(
                fake_openai.url,
                redis_storage(redis_server, str(tmp_path / f"journal{i}.db")),
                **{customer: 0.02, rich: 100.0},  # 100 answers; rich: no refusal
            ),
            ADMIN_ENV,
        )
        for i in range(2)
    ]
    before = evalsha_calls(redis_server)
    assert set(await fire_all([p.url for p in procs], 100, rich)) == {200}
    # per request its settle and its usage record, and a lease call now and then: no
    # reserve (three script calls per request without leases)
    assert evalsha_calls(redis_server) - before < 2.3 * 200

    statuses = await fire_all([p.url for p in procs], 200, customer)
    assert set(statuses) <= {200, 402}
    answered = statuses.count(200)
    # later requests, no longer crowded, fill what the holds of the first wave kept free
    for _ in range(5):
        more = await fire([p.url for p in procs], 40, concurrency=4, customer=customer)
        assert {status for status, _ in more} <= {200, 402}
        answered += sum(1 for status, _ in more if status == 200)

    for proc in procs:  # both read the one shared store
        report = settled_usage(proc, customer, 400 + 5 * 40)
        assert nano(report["spent_usd"]) == answered * COST <= nano(0.02)
        assert nano(report["cost_usd"]) == answered * COST
    assert answered >= 95  # refusals only while holds of requests in flight filled the budget
    nothing_held(procs[0], customer, 8)  # idle leases are given back


async def test_two_workers_on_redis_never_overspend(
    fake_openai: FakeOpenAI, redis_server: RedisProcess, tmp_path: Any
) -> None:
    fake_openai.on_model("priced", Reply(prompt_tokens=100, completion_tokens=50, delay=0.02))
    customer, rich = unique("workers"), unique("rich")
    config = budget_config(
        fake_openai.url,
        # leases stay open while the test runs: the graceful stop gives them back
        redis_storage(redis_server, str(tmp_path / "journal.db"), budget_lease_idle=600),
        **{customer: 0.01, rich: 100.0},
    )
    env = {"TEST_OPENAI_KEY": PROVIDER_KEY, **ADMIN_ENV}
    proc = SidecarProcess(config, env, str(tmp_path), extra_args=["--workers", "2"]).start()
    try:
        before = evalsha_calls(redis_server)
        assert set(await fire_all([proc.url], 200, rich)) == {200}
        assert evalsha_calls(redis_server) - before < 2.3 * 200  # no reserve per request

        results = await fire([proc.url], 300, concurrency=60, customer=customer)
        answered = assert_clean_refusals(results)
        report = settled_usage(proc, customer, 300)
        assert nano(report["spent_usd"]) == answered * COST <= nano(0.01)
        assert nano(report["cost_usd"]) == answered * COST
        assert answered >= 40
        assert leased(redis_server, rich) > 0  # the leases are still open…
    finally:
        assert proc.stop() == 0
    for name in (customer, rich):  # …until the graceful stop gives them back
        assert held(redis_server, name) == 0
    assert nano(spent_of_stopped(redis_server, customer)) == answered * COST


async def test_kill_9_with_leases_open_loses_no_settled_spend_and_frees_them_at_ttl(
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    redis_server: RedisProcess,
    tmp_path: Any,
) -> None:
    fake_openai.on_model("priced", Reply(prompt_tokens=100, completion_tokens=50, delay=0.05))
    customer = unique("killed")
    limit = 0.01  # 50 answers
    procs = [
        sidecar_factory(
            budget_config(
                fake_openai.url,
                redis_storage(redis_server, str(tmp_path / f"j{i}.db"), reservation_ttl=3),
                **{customer: limit},
            ),
            ADMIN_ENV,
        )
        for i in range(2)
    ]
    answered = [0]

    async def load(proc: SidecarProcess, seconds: float) -> None:
        async with aiohttp.ClientSession() as session:

            async def loop() -> None:
                deadline = asyncio.get_running_loop().time() + seconds
                while asyncio.get_running_loop().time() < deadline:
                    try:
                        async with session.post(
                            proc.url + CHAT, json=BODY, headers={"FC-Customer": customer}
                        ) as resp:
                            await resp.read()
                            answered[0] += resp.status == 200
                    except aiohttp.ClientError:
                        return

            await asyncio.gather(*(loop() for _ in range(10)))

    killed, survivor = procs
    runner = asyncio.create_task(load(killed, 30))
    await asyncio.sleep(0.6)  # the killed sidecar holds a lease, requests in flight on it
    assert leased(redis_server, customer) > 0
    killed.stop(signal.SIGKILL)
    await runner
    await load(survivor, 5)  # the survivor spends what is left, up to the limit

    report = usage_of(survivor, customer)
    assert nano(report["spent_usd"]) == nano(report["cost_usd"])  # nothing settled was lost
    assert nano(report["spent_usd"]) <= nano(limit)
    assert nano(report["spent_usd"]) >= answered[0] * COST  # every answer was charged
    after = nothing_held(survivor, customer, 10)  # the killed one's lease expired with its TTL
    assert nano(after["spent_usd"]) == nano(after["cost_usd"]) <= nano(limit)
    assert nano(after["spent_usd"]) == nano(report["spent_usd"])
