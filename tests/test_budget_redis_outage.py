"""Budgets on redis while redis is down: fail closed (503 store_unavailable) or fail open with
a local journal that is replayed when redis returns, nothing lost and nothing counted twice."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import RedisProcess, SidecarProcess, free_port, wait_until
from tests.support import metric, metric_samples, post_chat
from tests.test_budget import ADMIN_ENV, ANSWER, BODY, COST, budget_config, nano, usage_of
from tests.upstreams.openai_fake import FakeOpenAI

pytestmark = pytest.mark.redis


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class DurableRedis(RedisProcess):
    """A private redis-server that keeps its data across stop and start (append-only file)."""

    def start(self) -> DurableRedis:
        binary = self.binary()
        assert binary is not None
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(lambda: _pong(self.port), 10)
        return self


@pytest.fixture
def durable_redis() -> Iterator[DurableRedis]:
    if RedisProcess.binary() is None:
        pytest.skip("redis-server not found")
    server = DurableRedis().start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


def journal_entries(path: Path, *scripts: str) -> int:
    """Entries waiting in the journal (only those of `scripts`, when given)."""
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT entry FROM journal").fetchall()
    return sum(1 for (entry,) in rows if not scripts or json.loads(entry)["script"] in scripts)


def fail_open_config(upstream: str, redis: RedisProcess, journal: Path) -> dict[str, Any]:
    storage = {"backend": "redis", "redis_url": redis.url, "fail_open": True,
               "journal_path": str(journal)}  # fmt: skip
    return budget_config(upstream, storage, acme=1.0)


def test_fail_open_journals_spend_while_redis_is_down_and_replays_it(
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    durable_redis: DurableRedis,
    tmp_path: Path,
) -> None:
    fake_openai.on_model("priced", ANSWER)
    journal = tmp_path / "journal.db"
    proc = sidecar_factory(fail_open_config(fake_openai.url, durable_redis, journal), ADMIN_ENV)
    for _ in range(3):
        assert post_chat(proc, BODY, {"FC-Customer": "acme"}).status == 200

    durable_redis.stop()
    during = [post_chat(proc, BODY, {"FC-Customer": "acme"}) for _ in range(4)]
    unbudgeted = post_chat(proc, BODY, {"FC-Customer": "nobody"})

    assert [a.status for a in during] == [200] * 4
    assert unbudgeted.status == 200
    assert during[-1].headers["X-Ringside-Budget-Remaining-USD"] == "0.9986"  # 7 x 0.0002
    wait_until(lambda: journal_entries(journal) > 0, 5)

    durable_redis.start()
    wait_until(lambda: journal_entries(journal) == 0, 10)
    report = usage_of(proc, "acme")
    assert nano(report["spent_usd"]) == 7 * COST
    assert report["requests"] == 7
    assert nano(report["cost_usd"]) == 7 * COST
    assert usage_of(proc, "nobody")["requests"] == 1


def test_a_journal_replayed_twice_is_counted_once(
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    durable_redis: DurableRedis,
    tmp_path: Path,
) -> None:
    fake_openai.on_model("priced", ANSWER)
    journal = tmp_path / "journal.db"
    proc = sidecar_factory(fail_open_config(fake_openai.url, durable_redis, journal), ADMIN_ENV)
    durable_redis.stop()
    for _ in range(3):
        assert post_chat(proc, BODY, {"FC-Customer": "acme"}).status == 200
    # 3 x (settle, record), the customer's index entry once (budget_redis: once a minute per
    # tag); and a release per reserve that met the outage
    wait_until(lambda: journal_entries(journal, "settle", "finish", "index") == 7, 5)
    proc.stop(signal.SIGKILL)
    backup = tmp_path / "backup"
    backup.mkdir()
    copies = [p for p in tmp_path.glob("journal.db*") if not p.name.endswith("-shm")]
    for path in copies:
        shutil.copy(path, backup / path.name)

    durable_redis.start()
    proc.start()  # replays the journal left by the killed process
    wait_until(lambda: journal_entries(journal) == 0, 10)
    assert nano(usage_of(proc, "acme")["spent_usd"]) == 3 * COST
    proc.stop()

    for path in tmp_path.glob("journal.db*"):  # as if it died before deleting what it applied
        path.unlink()
    for path in backup.iterdir():
        shutil.copy(path, tmp_path / path.name)
    assert journal_entries(journal, "settle", "finish", "index") == 7
    proc.start()
    wait_until(lambda: journal_entries(journal) == 0, 10)

    report = usage_of(proc, "acme")
    assert nano(report["spent_usd"]) == 3 * COST
    assert report["requests"] == 3
    assert nano(report["cost_usd"]) == 3 * COST


def test_without_fail_open_budgeted_requests_get_503_and_unbudgeted_still_flow(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    fake_openai.on_model("priced", ANSWER)
    storage = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{free_port()}/0",
               "journal_path": str(tmp_path / "journal.db")}  # fmt: skip
    proc = sidecar_factory(budget_config(fake_openai.url, storage, acme=1.0), ADMIN_ENV)

    budgeted = post_chat(proc, BODY, {"FC-Customer": "acme"})
    unbudgeted = post_chat(proc, BODY, {"FC-Customer": "nobody"})
    anonymous = post_chat(proc, BODY)

    assert budgeted.status == 503
    assert budgeted.error["code"] == "store_unavailable"
    assert "fail_open" in budgeted.error["message"]
    assert fake_openai.models_called() == ["priced", "priced"]  # only the unbudgeted two
    assert unbudgeted.status == anonymous.status == 200


@pytest.fixture
def private_redis() -> Iterator[RedisProcess]:
    """A redis-server of this test alone: it is stopped with SIGSTOP, which no other may see."""
    if RedisProcess.binary() is None:
        pytest.skip("redis-server not found")
    server = RedisProcess().start()
    yield server
    assert server.proc is not None
    server.proc.send_signal(signal.SIGCONT)
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


def test_a_reserve_whose_answer_was_lost_is_released_once_redis_answers(
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    private_redis: RedisProcess,
    tmp_path: Path,
) -> None:
    """Redis frozen (SIGSTOP) longer than the store's 2 s socket timeout: the reserve waits in
    the socket buffers, the client gets 503, and redis runs the reserve once it wakes up. The
    hold must not stay until its TTL (an hour here). Per-request holds (no leases: a lease's
    frozen-redis case is in test_budget_lease.py)."""
    fake_openai.on_model("priced", ANSWER)
    storage = {"backend": "redis", "redis_url": private_redis.url, "reservation_ttl": 3600,
               "journal_path": str(tmp_path / "journal.db"), "budget_leases": False}  # fmt: skip
    proc = sidecar_factory(budget_config(fake_openai.url, storage, acme=1.0), ADMIN_ENV)
    assert post_chat(proc, BODY, {"FC-Customer": "acme"}).status == 200
    assert usage_of(proc, "acme")["reserved_usd"] == 0
    assert private_redis.proc is not None

    private_redis.proc.send_signal(signal.SIGSTOP)
    try:
        refused = post_chat(proc, BODY, {"FC-Customer": "acme"})
    finally:
        private_redis.proc.send_signal(signal.SIGCONT)

    assert refused.status == 503
    assert refused.error["code"] == "store_unavailable"
    try:
        report = wait_until(lambda: (u := usage_of(proc, "acme"))["reserved_usd"] == 0 and u, 8)
    except TimeoutError:
        raise AssertionError(f"still held: {usage_of(proc, 'acme')}") from None
    assert nano(report["spent_usd"]) == COST  # the first request's, nothing more
    assert fake_openai.models_called() == ["priced"]


def test_an_outage_is_logged_once_and_each_refusal_counted(
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    private_redis: RedisProcess,
    tmp_path: Path,
) -> None:
    fake_openai.on_model("priced", ANSWER)
    # per-request holds: with a lease, the first request after the stop may still be admitted
    # on the room it holds (test_budget_lease.py)
    storage = {"backend": "redis", "redis_url": private_redis.url, "budget_leases": False,
               "journal_path": str(tmp_path / "journal.db")}  # fmt: skip
    proc = sidecar_factory(budget_config(fake_openai.url, storage, acme=1.0), ADMIN_ENV)
    assert post_chat(proc, BODY, {"FC-Customer": "acme"}).status == 200

    private_redis.stop()
    refused = [post_chat(proc, BODY, {"FC-Customer": "acme"}).status for _ in range(25)]
    private_redis.start()
    for _ in range(1000):  # until the store tries redis again (a fraction of a second)
        if (status := post_chat(proc, BODY, {"FC-Customer": "acme"}).status) != 503:
            break
        refused.append(status)
    assert status == 200

    assert len(refused) >= 25 and set(refused) == {503}
    log = proc.stderr()
    assert log.count("budget store unavailable") == 1, log
    (recovered,) = [line for line in log.splitlines() if "budget store answers again" in line]
    assert f"meanwhile {len(refused)} budgeted requests refused with 503" in recovered
    samples = metric_samples(proc)
    labels = {"store": "budget", "operation": "reserve"}
    assert metric(samples, "ringside_store_unavailable_total", **labels) == len(refused)
