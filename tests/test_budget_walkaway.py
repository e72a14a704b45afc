"""A client that goes away mid-request leaves nothing held: its hold is released at once, not
when its reservation TTL runs out (here an hour), whatever the request was waiting for."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.procs import RedisProcess, SidecarProcess, wait_until
from tests.support import CHAT
from tests.test_budget import (
    ADMIN_ENV,
    BODY,
    EVERY_STORE,
    budget_config,
    nano,
    redis_or_none,
    storage_for,
    unique,
    usage_of,
)
from tests.upstreams.openai_fake import FakeOpenAI, Reply

__all__ = ["redis_or_none"]  # a fixture, used by name

HOUR = 3600  # reservation TTL: a hold still there after seconds was not released


def budgeted_sidecar(
    backend: str,
    fake_openai: FakeOpenAI,
    factory: Callable[..., SidecarProcess],
    redis: RedisProcess | None,
    tmp_path: Any,
) -> tuple[SidecarProcess, str, dict[str, Any]]:
    """A sidecar on `backend` with a $1 customer (returned with the storage section) whose
    holds would outlive the test unless released."""
    customer = unique("left")
    storage = {**storage_for(backend, tmp_path, redis), "reservation_ttl": HOUR}
    proc = factory(budget_config(fake_openai.url, storage, **{customer: 1.0}), ADMIN_ENV)
    return proc, customer, storage


def walk_away(proc: SidecarProcess, body: dict[str, Any], customer: str, after: float) -> None:
    """Send a whole chat request (X-Request-Id: the customer), then close the connection
    `after` seconds later, unanswered."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"FC-Customer: {customer}\r\nX-Request-Id: {customer}\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as conn:
        conn.sendall(head + payload)
        time.sleep(after)
        conn.setblocking(False)
        with pytest.raises(BlockingIOError):
            conn.recv(1)  # still no answer: the client leaves while the request waits


def books_balance(proc: SidecarProcess, customer: str) -> dict[str, Any]:
    """The customer's report once its one record is written and nothing is held; the request
    is logged as closed by the client, charged nothing (no token was produced)."""
    try:
        report: dict[str, Any] = wait_until(
            lambda: (
                # the record's status arrives after the settle that created it (redis): wait
                (u := usage_of(proc, customer))["requests"] == 1
                and u["errors"] == 1
                and not u["reserved_usd"]
                and u
            ),
            timeout=5,
        )
    except TimeoutError:
        raise AssertionError(f"still held, or no record: {usage_of(proc, customer)}") from None
    assert nano(report["spent_usd"]) == nano(report["cost_usd"]) == 0
    line = wait_until(lambda: [r for r in proc.access_log() if r["request_id"] == customer])[0]
    assert (line["status"], line["customer"], line["cost_usd"]) == (499, customer, 0)
    return report


@EVERY_STORE
def test_a_stream_left_before_the_upstream_answers_releases_its_hold(
    backend: str,
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    redis_or_none: RedisProcess | None,
    tmp_path: Any,
) -> None:
    fake_openai.on_model("priced", Reply(delay=1.5))  # the head comes late
    proc, customer, _ = budgeted_sidecar(
        backend, fake_openai, sidecar_factory, redis_or_none, tmp_path
    )

    walk_away(proc, {**BODY, "stream": True}, customer, after=0.4)

    wait_until(lambda: fake_openai.received and fake_openai.received[0].disconnected, 3)
    books_balance(proc, customer)


@contextmanager
def stalled_store(
    backend: str, storage: dict[str, Any], redis: RedisProcess | None
) -> Iterator[None]:
    """The store answers nothing for a while: sqlite locked by another writer, redis paused."""
    if backend == "sqlite":
        db = sqlite3.connect(storage["sqlite_path"], isolation_level=None)
        db.execute("BEGIN IMMEDIATE")  # the sidecar's next transaction waits for this lock
        try:
            yield
        finally:
            db.execute("ROLLBACK")
            db.close()
        return
    import redis as redis_client

    assert redis is not None
    client = redis_client.Redis.from_url(redis.url)
    client.client_pause(1200)  # ms: every client's commands wait, scripts included
    try:
        yield
    finally:
        client.client_unpause()
        client.close()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_request_left_while_its_reserve_waits_on_the_store_releases_its_hold(
    backend: str,
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    redis_or_none: RedisProcess | None,
    tmp_path: Any,
) -> None:
    fake_openai.on_model("priced", Reply())
    proc, customer, storage = budgeted_sidecar(
        backend, fake_openai, sidecar_factory, redis_or_none, tmp_path
    )
    assert usage_of(proc, customer)["reserved_usd"] == 0  # the store is open and answering

    with stalled_store(backend, storage, redis_or_none):
        walk_away(proc, BODY, customer, after=0.5)  # the reserve is queued or on the wire

    books_balance(proc, customer)
    assert fake_openai.received == []  # it never reached the upstream
