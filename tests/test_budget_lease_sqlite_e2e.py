"""Budget leases on the sqlite store end to end: real sidecars (and --workers) on one sqlite
file, admitting requests on their leases. Never over the limit, spent equal to the usage
records, nothing held once leases are given back or, after a `kill -9`, expired."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from tests.conftest import PROVIDER_KEY
from tests.procs import SidecarProcess
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
from tests.test_budget_lease_e2e import fire_all, nothing_held
from tests.upstreams.openai_fake import FakeOpenAI, Reply


def sqlite_storage(path: str, **more: Any) -> dict[str, Any]:
    return {"backend": "sqlite", "sqlite_path": path, **more}


def in_file(path: str, customer: str) -> tuple[int, int, int]:
    """spent, held (unexpired) and the part of it leases hold, as the file has them."""
    db = sqlite3.connect(path)
    try:
        scope = f"cust:{customer}"
        (spent,) = db.execute(
            "SELECT COALESCE(SUM(spent), 0) FROM budget_spent WHERE scope = ?", (scope,)
        ).fetchone()
        held, leased = db.execute(
            "SELECT COALESCE(SUM(amount), 0), COALESCE(SUM(CASE WHEN id LIKE 'L%' "
            "THEN amount END), 0) FROM budget_hold WHERE scope = ? AND expires > ?",
            (scope, time.time()),
        ).fetchone()
    finally:
        db.close()
    return spent, held, leased


async def test_two_sidecars_on_one_file_at_200_concurrent_requests_never_overspend(
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    tmp_path: Any,
) -> None:
    fake_openai.on_model("priced", Reply(prompt_tokens=100, completion_tokens=50, delay=0.02))
    customer, rich = unique("leased"), unique("rich")
    path = str(tmp_path / "shared.db")
    procs = [
        sidecar_factory(
            budget_config(fake_openai.url, sqlite_storage(path), **{customer: 0.02, rich: 100.0}),
            ADMIN_ENV,
        )
        for _ in range(2)
    ]
    assert set(await fire_all([p.url for p in procs], 100, rich)) == {200}
    assert in_file(path, rich)[2] > 0  # admitted on leases

    statuses = await fire_all([p.url for p in procs], 200, customer)
    assert set(statuses) <= {200, 402}
    answered = statuses.count(200)
    for _ in range(5):  # later requests, no longer crowded, fill what the first wave kept
        more = await fire([p.url for p in procs], 40, concurrency=4, customer=customer)
        assert {status for status, _ in more} <= {200, 402}
        answered += sum(1 for status, _ in more if status == 200)

    for proc in procs:  # both read the one shared file
        report = settled_usage(proc, customer, 400 + 5 * 40)
        assert nano(report["spent_usd"]) == answered * COST <= nano(0.02)
        assert nano(report["cost_usd"]) == answered * COST
    assert answered >= 95  # refusals only while holds of requests in flight filled the budget
    nothing_held(procs[0], customer, 8)  # idle leases are given back
    nothing_held(procs[1], rich, 8)
    assert in_file(path, customer) == (answered * COST, 0, 0)


async def test_two_workers_on_one_file_never_overspend(
    fake_openai: FakeOpenAI, tmp_path: Any
) -> None:
    fake_openai.on_model("priced", Reply(prompt_tokens=100, completion_tokens=50, delay=0.02))
    customer, rich = unique("workers"), unique("rich")
    path = str(tmp_path / "workers.db")
    config = budget_config(
        fake_openai.url,
        sqlite_storage(path, budget_lease_idle=600),  # leases stay open until the stop
        **{customer: 0.01, rich: 100.0},
    )
    env = {"TEST_OPENAI_KEY": PROVIDER_KEY, **ADMIN_ENV}
    proc = SidecarProcess(config, env, str(tmp_path), extra_args=["--workers", "2"]).start()
    try:
        assert set(await fire_all([proc.url], 200, rich)) == {200}
        results = await fire([proc.url], 300, concurrency=60, customer=customer)
        answered = assert_clean_refusals(results)
        report = settled_usage(proc, customer, 300)
        assert nano(report["spent_usd"]) == answered * COST <= nano(0.01)
        assert nano(report["cost_usd"]) == answered * COST
        assert answered >= 40
        assert in_file(path, rich)[2] > 0  # the leases are still open…
    finally:
        assert proc.stop() == 0
    assert in_file(path, rich) == (200 * COST, 0, 0)  # …until the graceful stop gives them back
    assert in_file(path, customer) == (answered * COST, 0, 0)


async def test_kill_9_with_leases_open_loses_no_settled_spend_and_frees_them_at_ttl(
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    tmp_path: Any,
) -> None:
    fake_openai.on_model("priced", Reply(prompt_tokens=100, completion_tokens=50, delay=0.05))
    customer = unique("killed")
    limit = 0.01  # 50 answers
    path = str(tmp_path / "killed.db")
    procs = [
        sidecar_factory(
            budget_config(
                fake_openai.url, sqlite_storage(path, reservation_ttl=3), **{customer: limit}
            ),
            ADMIN_ENV,
        )
        for _ in range(2)
    ]
    answered = [0]

    async def load(proc: SidecarProcess, seconds: float) -> None:
        async with aiohttp.ClientSession() as session:

            async def loop() -> None:
                deadline = asyncio.get_running_loop().time() + seconds
                while asyncio.get_running_loop().time() < deadline:
                    try:
                        async with session.post(
                            proc.url + "/v1/chat/completions",
                            json=BODY,
                            headers={"FC-Customer": customer},
                        ) as resp:
                            await resp.read()
                            answered[0] += resp.status == 200
                    except aiohttp.ClientError:
                        return

            await asyncio.gather(*(loop() for _ in range(10)))

    killed, survivor = procs
    runner = asyncio.create_task(load(killed, 30))
    await asyncio.sleep(0.6)  # the killed sidecar holds a lease, requests in flight on it
    assert in_file(path, customer)[2] > 0
    killed.stop(signal.SIGKILL)
    await runner
    spent_at_kill = in_file(path, customer)[0]
    assert spent_at_kill >= answered[0] * COST  # every answer it gave was committed
    await load(survivor, 5)  # the survivor spends what is left, up to the limit

    report = usage_of(survivor, customer)
    assert nano(report["spent_usd"]) == nano(report["cost_usd"])  # nothing settled was lost
    assert nano(report["spent_usd"]) <= nano(limit)
    assert nano(report["spent_usd"]) >= answered[0] * COST  # every answer was charged
    after = nothing_held(survivor, customer, 10)  # the killed one's lease expired with its TTL
    assert nano(after["spent_usd"]) == nano(after["cost_usd"]) <= nano(limit)
    assert nano(after["spent_usd"]) == nano(report["spent_usd"])
    assert in_file(path, customer)[1:] == (0, 0)
