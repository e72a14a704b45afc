"""Hard budgets through HTTP: concurrent load never overspends, on every backend and across
sidecars sharing one redis; refusals are clean 402s; spent always equals the usage ledger."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import openai_config
from tests.procs import RedisProcess, SidecarProcess, wait_until
from tests.support import CHAT, HELLO, post_chat, request
from tests.upstreams.openai_fake import FakeOpenAI, Reply

PRICED = "fc:openai/priced"  # $1 per million input tokens, $2 per million output tokens
COST = 200_000  # nano-USD of one answer: 100 prompt tokens x 1000 + 50 completion tokens x 2000
ANSWER = Reply(content="ok", prompt_tokens=100, completion_tokens=50)
ADMIN_TOKEN = "admin-token-for-tests"
ADMIN_ENV = {"RINGSIDE_ADMIN_TOKEN": ADMIN_TOKEN}
BODY = {"model": PRICED, "messages": HELLO, "max_tokens": 60}


def budget_config(upstream: str, storage: dict[str, Any], **customers: float) -> dict[str, Any]:
    """Customers with a monthly budget in USD, the priced model, and `storage`."""
    config = openai_config(
        upstream,
        storage=storage,
        customers={n: {"budget": {"usd": usd, "period": "month"}} for n, usd in customers.items()},
    )
    config["models"][PRICED] = {
        "input_per_mtok": 1.0, "output_per_mtok": 2.0, "context": 128000, "max_output": 1000,
    }  # fmt: skip
    return config


def nano(usd: float | None) -> int:
    assert usd is not None
    return round(usd * 1_000_000_000)


def usage_of(proc: SidecarProcess, customer: str) -> dict[str, Any]:
    answer = request(
        proc.admin_url,
        "GET",
        f"/v1/customers/{customer}/usage",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert answer.status == 200, answer.body
    data: dict[str, Any] = answer.json()
    return data


def settled_usage(proc: SidecarProcess, customer: str, requests: int) -> dict[str, Any]:
    """The usage report once all `requests` records were written (they are written async)."""
    return wait_until(lambda: (u := usage_of(proc, customer))["requests"] == requests and u, 10)  # type: ignore[no-any-return]


async def fire(
    urls: list[str], count: int, concurrency: int, customer: str, body: dict[str, Any] = BODY
) -> list[tuple[int, dict[str, Any] | None]]:
    """`count` chat requests spread over `urls`, at most `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int, session: aiohttp.ClientSession) -> tuple[int, dict[str, Any] | None]:
        async with gate:
            url = urls[index % len(urls)] + CHAT
            async with session.post(url, json=body, headers={"FC-Customer": customer}) as resp:
                data = await resp.json()
                return resp.status, data.get("error")

    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(one(i, session) for i in range(count)))


def assert_clean_refusals(results: list[tuple[int, dict[str, Any] | None]]) -> int:
    """Every answer a 200 or a well-formed 402; returns the number of 200s."""
    for status, error in results:
        assert status in (200, 402), (status, error)
        if status == 402:
            assert error is not None and set(error) == {"message", "type", "param", "code"}
            assert error["code"] == "budget_exceeded" and error["type"] == "insufficient_quota"
            assert "limit $0.01 per month" in error["message"]
    return sum(1 for status, _ in results if status == 200)


def storage_for(backend: str, tmp_path: Any, redis_server: RedisProcess | None) -> dict[str, Any]:
    if backend == "memory":
        return {"backend": "memory"}
    if backend == "sqlite":
        return {"backend": "sqlite", "sqlite_path": str(tmp_path / "budget.db")}
    assert redis_server is not None
    return {
        "backend": "redis",
        "redis_url": redis_server.url,
        "journal_path": str(tmp_path / "journal.db"),
    }


@pytest.fixture
def redis_or_none(request: pytest.FixtureRequest) -> RedisProcess | None:
    if request.node.callspec.params.get("backend") != "redis":
        return None
    server: RedisProcess = request.getfixturevalue("redis_server")
    return server


EVERY_STORE = pytest.mark.parametrize(
    "backend", ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]
)  # with the redis_or_none fixture and storage_for(backend, ...)


def unique(prefix: str) -> str:
    return f"{prefix}_{os.urandom(4).hex()}"  # the session's redis-server is shared by tests


@EVERY_STORE
async def test_200_concurrent_requests_never_overspend_and_ledger_equals_spent(
    backend: str,
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    redis_or_none: RedisProcess | None,
    tmp_path: Any,
) -> None:
    fake_openai.on_model("priced", Reply(prompt_tokens=100, completion_tokens=50, delay=0.02))
    customer = unique("load")
    storage = storage_for(backend, tmp_path, redis_or_none)
    proc = sidecar_factory(budget_config(fake_openai.url, storage, **{customer: 0.01}), ADMIN_ENV)

    results = await fire([proc.url], 200, concurrency=50, customer=customer)

    answered = assert_clean_refusals(results)
    report = settled_usage(proc, customer, 200)
    spent = nano(report["spent_usd"])
    assert spent <= nano(0.01)
    assert spent == answered * COST
    assert nano(report["cost_usd"]) == spent  # the ledger of usage records
    assert answered >= 45  # the budget fits 50: holds of the worst case only delay the last few
    # nothing stays held: on redis a lease's rest goes back once idle (budget_lease_idle, 2 s)
    wait_until(lambda: usage_of(proc, customer)["reserved_usd"] == 0, 6)


@pytest.mark.redis
async def test_three_sidecars_sharing_one_redis_never_overspend(
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    redis_server: RedisProcess,
    tmp_path: Any,
) -> None:
    fake_openai.on_model("priced", Reply(prompt_tokens=100, completion_tokens=50, delay=0.02))
    customer = unique("shared")
    procs = [
        sidecar_factory(
            budget_config(
                fake_openai.url,
                {"backend": "redis", "redis_url": redis_server.url,
                 "journal_path": str(tmp_path / f"journal{i}.db")},
                **{customer: 0.01},
            ),
            ADMIN_ENV,
        )
        for i in range(3)
    ]  # fmt: skip

    results = await fire([p.url for p in procs], 210, concurrency=60, customer=customer)

    answered = assert_clean_refusals(results)
    for proc in procs:  # each reads the one shared store
        report = settled_usage(proc, customer, 210)
        assert nano(report["spent_usd"]) == answered * COST <= nano(0.01)
        assert nano(report["cost_usd"]) == answered * COST
    assert answered >= 45


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def test_kill_9_under_load_keeps_spent_equal_to_the_ledger_and_holds_expire(
    backend: str,
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    redis_or_none: RedisProcess | None,
    tmp_path: Any,
) -> None:
    fake_openai.on_model("priced", Reply(prompt_tokens=100, completion_tokens=50, delay=0.3))
    customer = unique("crash")
    storage = {**storage_for(backend, tmp_path, redis_or_none), "reservation_ttl": 4}
    proc = sidecar_factory(budget_config(fake_openai.url, storage, **{customer: 1.0}), ADMIN_ENV)

    async def load() -> None:
        async with aiohttp.ClientSession() as session:

            async def loop() -> None:
                while True:
                    try:
                        async with session.post(
                            proc.url + CHAT, json=BODY, headers={"FC-Customer": customer}
                        ) as resp:
                            await resp.read()
                    except aiohttp.ClientError:
                        return

            await asyncio.gather(*(loop() for _ in range(20)))

    runner = asyncio.create_task(load())
    await asyncio.sleep(1.2)  # several waves settled, the next one in flight
    proc.stop(signal.SIGKILL)
    await runner
    proc.start()  # on the same file (or redis)

    report = usage_of(proc, customer)
    assert report["spent_usd"] > 0
    assert nano(report["spent_usd"]) == nano(report["cost_usd"])  # committed with its record
    assert report["reserved_usd"] > 0  # the killed requests' holds are still there…
    wait_until(lambda: usage_of(proc, customer)["reserved_usd"] == 0, 8)  # …until their TTL
    after = usage_of(proc, customer)
    assert nano(after["remaining_usd"]) == nano(1.0) - nano(after["spent_usd"])
    assert nano(after["spent_usd"]) == nano(report["spent_usd"])


def test_remaining_budget_header_and_cost_header(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    fake_openai.on_model("priced", ANSWER)
    proc = sidecar_factory(
        budget_config(fake_openai.url, {"backend": "memory"}, acme=0.001), ADMIN_ENV
    )
    first = post_chat(proc, BODY, {"FC-Customer": "acme"})
    second = post_chat(proc, BODY, {"FC-Customer": "acme"})
    unbudgeted = post_chat(proc, BODY, {"FC-Customer": "someone-else"})

    assert first.status == second.status == unbudgeted.status == 200
    assert first.headers["X-Ringside-Cost-USD"] == "0.0002"
    assert first.headers["X-Ringside-Budget-Remaining-USD"] == "0.0008"
    assert second.headers["X-Ringside-Budget-Remaining-USD"] == "0.0006"
    assert unbudgeted.headers["X-Ringside-Cost-USD"] == "0.0002"
    assert "X-Ringside-Budget-Remaining-USD" not in unbudgeted.headers


def test_refusal_names_limit_spent_and_reset_time(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    fake_openai.on_model("priced", ANSWER)
    config = budget_config(fake_openai.url, {"backend": "memory"})
    config["customers"] = {"daily": {"budget": {"usd": 0.0003, "period": "day"}}}
    proc = sidecar_factory(config)

    assert post_chat(proc, BODY, {"FC-Customer": "daily"}).status == 200
    refused = post_chat(proc, BODY, {"FC-Customer": "daily"})

    assert refused.status == 402
    error = refused.error
    assert (error["code"], error["type"]) == ("budget_exceeded", "insufficient_quota")
    tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    message = error["message"]
    assert "customer 'daily'" in message and "limit $0.0003 per day" in message
    assert "spent $0.0002" in message
    assert f"resets at {tomorrow.isoformat()}T00:00:00Z" in message
    assert refused.headers["X-Ringside-Budget-Remaining-USD"] == "0.0001"
    assert len(fake_openai.received) == 1  # the refused request never reached the provider


def test_a_request_whose_worst_case_does_not_fit_is_refused_before_any_spend(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    fake_openai.on_model("priced", ANSWER)
    proc = sidecar_factory(budget_config(fake_openai.url, {"backend": "memory"}, acme=0.001))
    huge = {**BODY, "max_tokens": 1000}  # worst case: 1000 x $2/M = $0.002 > $0.001

    refused = post_chat(proc, huge, {"FC-Customer": "acme"})

    assert refused.status == 402 and refused.error["code"] == "budget_exceeded"
    assert "may cost up to $0.002" in refused.error["message"]
    assert fake_openai.received == []
    assert post_chat(proc, BODY, {"FC-Customer": "acme"}).status == 200


def test_key_budget_applies_to_every_request_of_the_key(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    import hashlib

    fake_openai.on_model("priced", ANSWER)
    config = budget_config(fake_openai.url, {"backend": "memory"})
    config["keys"] = [
        {"id": "capped", "sha256": hashlib.sha256(b"rk_capped").hexdigest(), "developer": "dev1",
         "budget": {"usd": 0.0004, "period": "total"}},
    ]  # fmt: skip
    proc = sidecar_factory(config)
    auth = {"Authorization": "Bearer rk_capped"}

    first = post_chat(proc, BODY, auth)
    second = post_chat(proc, BODY, {**auth, "FC-Customer": "any"})

    assert first.status == 200
    assert first.headers["X-Ringside-Budget-Remaining-USD"] == "0.0002"
    assert second.status == 402
    assert "API key 'capped'" in second.error["message"]
    assert "limit $0.0004 in total" in second.error["message"]
    assert "does not reset" in second.error["message"]


def test_budgeted_customer_cannot_use_an_unpriced_model(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(budget_config(fake_openai.url, {"backend": "memory"}, acme=1.0))
    unpriced = {**BODY, "model": "fc:openai/not-in-the-catalog"}

    refused = post_chat(proc, unpriced, {"FC-Customer": "acme"})
    free = post_chat(proc, unpriced, {"FC-Customer": "unbudgeted"})

    assert refused.status == 400
    assert refused.error["param"] == "model"
    assert "fc:openai/not-in-the-catalog has no price" in refused.error["message"]
    assert fake_openai.models_called() == ["not-in-the-catalog"]  # only the unbudgeted call
    assert free.status == 200
    assert "X-Ringside-Cost-USD" not in free.headers  # unpriced: no cost to report


def test_failed_attempt_without_usage_costs_nothing_and_releases_its_hold(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    fake_openai.script(Reply(status=500))
    proc = sidecar_factory(
        budget_config(fake_openai.url, {"backend": "memory"}, acme=1.0), ADMIN_ENV
    )

    failed = post_chat(proc, BODY, {"FC-Customer": "acme"})

    assert failed.status == 503
    report = settled_usage(proc, "acme", 1)
    assert (report["spent_usd"], report["reserved_usd"], report["remaining_usd"]) == (0, 0, 1.0)


def test_cascade_charges_each_attempt_that_produced_usage(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    fake_openai.script(Reply(status=503), ANSWER)
    proc = sidecar_factory(
        budget_config(fake_openai.url, {"backend": "memory"}, acme=1.0), ADMIN_ENV
    )
    cascade = {**BODY, "model": ["fc:openai/gpt-4o", PRICED]}

    answer = post_chat(proc, cascade, {"FC-Customer": "acme"})

    assert answer.status == 200
    assert answer.headers["X-Ringside-Fallback-Triggered"] == "true"
    report = settled_usage(proc, "acme", 1)
    assert nano(report["spent_usd"]) == COST
    assert report["models"] == [
        {"model": PRICED, "requests": 1, "tokens_in": 100, "tokens_out": 50, "cost_usd": 0.0002}
    ]


def test_streamed_output_is_charged(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    fake_openai.on_model("priced", ANSWER)
    proc = sidecar_factory(
        budget_config(fake_openai.url, {"backend": "memory"}, acme=1.0), ADMIN_ENV
    )

    streamed = post_chat(proc, {**BODY, "stream": True}, {"FC-Customer": "acme"})

    assert streamed.status == 200
    assert streamed.headers["X-Ringside-Budget-Remaining-USD"] == "1.0"  # before this request
    report = settled_usage(proc, "acme", 1)
    assert nano(report["spent_usd"]) == COST == nano(report["cost_usd"])
    assert report["tokens"] == {"input": 100, "output": 50, "total": 150}


def test_schema_reprompts_are_charged(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    fake_openai.script(
        Reply(content="not json", prompt_tokens=100, completion_tokens=50),
        Reply(content='{"answer": 42}', prompt_tokens=100, completion_tokens=50),
    )
    proc = sidecar_factory(
        budget_config(fake_openai.url, {"backend": "memory"}, acme=1.0), ADMIN_ENV
    )
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"]}  # fmt: skip
    response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    body = {**BODY, "response_format": response_format}

    answer = post_chat(proc, body, {"FC-Customer": "acme"})

    assert answer.status == 200
    assert answer.headers["X-Ringside-Schema-Reprompts"] == "1"
    assert answer.headers["X-Ringside-Cost-USD"] == "0.0004"
    report = settled_usage(proc, "acme", 1)
    assert nano(report["spent_usd"]) == 2 * COST == nano(report["cost_usd"])


def test_streamed_partial_output_is_charged(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    fake_openai.script(Reply(content="x" * 400, chunks=4, error_after_chunks=2))
    proc = sidecar_factory(
        budget_config(fake_openai.url, {"backend": "memory"}, acme=1.0), ADMIN_ENV
    )

    cut = post_chat(proc, {**BODY, "stream": True}, {"FC-Customer": "acme"})

    assert cut.status == 200 and b'"error"' in cut.body
    report = settled_usage(proc, "acme", 1)
    assert report["tokens"]["output"] == 50  # 200 characters streamed before the failure
    assert nano(report["spent_usd"]) == nano(report["cost_usd"]) > 0


@pytest.mark.redis
def test_a_redis_that_lost_its_scripts_still_holds_budgets_and_limits(
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    redis_server: RedisProcess,
    tmp_path: Any,
) -> None:
    """A restart or failover empties redis's script cache; the pipelined EVALSHA calls must
    load the scripts again rather than fail the request."""
    import redis

    fake_openai.on_model("priced", ANSWER)
    customer = unique("flushed")
    config = budget_config(
        fake_openai.url, storage_for("redis", tmp_path, redis_server), **{customer: 1.0}
    )
    # 10 per minute: one refills in 6 s, so the count below cannot drift under a slow machine
    config["customers"][customer]["rate_limit"] = {"rpm": 10}
    proc = sidecar_factory(config, ADMIN_ENV)
    first = post_chat(proc, BODY, {"FC-Customer": customer})
    assert first.status == 200

    redis.Redis.from_url(redis_server.url).script_flush()
    second = post_chat(proc, BODY, {"FC-Customer": customer})

    assert second.status == 200
    assert second.headers["x-ratelimit-remaining-requests"] == "8"  # both counted in redis
    assert second.headers["X-Ringside-Budget-Remaining-USD"] == "0.9996"  # 1 − 2 × $0.0002
    report = settled_usage(proc, customer, 2)
    assert nano(report["spent_usd"]) == 2 * COST
