"""`ringside serve --workers N`: one listener shared by N processes, metrics summed over all,
rate limits counted once for all of them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import aiohttp
import openai

from tests.conftest import PROVIDER_KEY, openai_config
from tests.procs import SidecarProcess, wait_until
from tests.support import post_chat
from tests.upstreams.openai_fake import FakeOpenAI, Reply

MESSAGES = [{"role": "user", "content": "hello"}]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(line) for line in out.stdout.split()]


def test_two_workers_share_the_port_and_report_summed_metrics(
    fake_openai: FakeOpenAI, tmp_path: Any
) -> None:
    config = openai_config(
        fake_openai.url, storage={"backend": "sqlite", "sqlite_path": str(tmp_path / "r.db")}
    )
    proc = SidecarProcess(
        config, {"TEST_OPENAI_KEY": PROVIDER_KEY}, str(tmp_path), extra_args=["--workers", "2"]
    ).start()
    try:
        assert proc.proc is not None
        workers = wait_until(
            lambda: len(_children(proc.proc.pid)) == 2 and _children(proc.proc.pid)
        )
        assert len(workers) == 2
        for _ in range(20):
            client = openai.OpenAI(base_url=proc.base_url, api_key="open", max_retries=0)
            client.chat.completions.create(model="fc:openai/gpt-4o-mini", messages=MESSAGES)
        handled = {line["request_id"] for line in proc.access_log()}
        assert len(handled) == 20
        # each worker hands its counts to the shared files at least once a second
        assert wait_until(
            lambda: 'ringside_requests_total{code="200"} 20.0' in proc.metrics_text(), timeout=5
        )
    finally:
        assert proc.stop() == 0
    assert all(not os.path.exists(f"/proc/{pid}") for pid in workers)


def test_workers_refuse_the_per_process_memory_store(tmp_path: Any) -> None:
    config_path = tmp_path / "c.yaml"
    config_path.write_text("storage: {backend: memory}\nproviders: {m: {kind: mock}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(config_path), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "storage.backend" in result.stderr and "sqlite or redis" in result.stderr


def sqlite_workers(
    fake_openai: FakeOpenAI, tmp_path: Any, rate_limit: dict[str, int]
) -> SidecarProcess:
    """Two workers on one sqlite file, customer `acme` under `rate_limit`."""
    config = openai_config(
        fake_openai.url,
        storage={"backend": "sqlite", "sqlite_path": str(tmp_path / "r.db")},
        customers={"acme": {"rate_limit": rate_limit}},
    )
    return SidecarProcess(
        config, {"TEST_OPENAI_KEY": PROVIDER_KEY}, str(tmp_path), extra_args=["--workers", "2"]
    ).start()


async def test_workers_on_sqlite_share_one_rate_limit(
    fake_openai: FakeOpenAI, tmp_path: Any
) -> None:
    proc = sqlite_workers(fake_openai, tmp_path, {"rpm": 10})
    body = {"model": "fc:openai/gpt-4o-mini", "messages": MESSAGES}

    async def one() -> tuple[int, str | None, str | None]:
        # a connection of its own each: SO_REUSEPORT spreads them over both workers
        async with aiohttp.ClientSession() as session:
            url = proc.base_url + "/chat/completions"
            async with session.post(url, json=body, headers={"FC-Customer": "acme"}) as answer:
                payload = await answer.json()
                code = payload["error"]["code"] if answer.status != 200 else None
                return answer.status, code, answer.headers.get("X-Ringside-RateLimit-Scope")

    try:
        answers = await asyncio.gather(*(one() for _ in range(60)))
    finally:
        assert proc.stop() == 0
    assert answers.count((200, None, None)) == 10  # per-worker limits would admit about 20
    assert answers.count((429, "rate_limited", "customer")) == 50


def test_workers_on_sqlite_settle_token_estimates_in_the_shared_file(
    fake_openai: FakeOpenAI, tmp_path: Any
) -> None:
    """Each request is admitted on its estimate (~920 tokens of a 1000 tpm) and settled to
    what it used; the next may land on the other worker, which must see the settled cell."""
    proc = sqlite_workers(fake_openai, tmp_path, {"tpm": 1000})
    body = {"model": "fc:openai/gpt-4o-mini", "messages": MESSAGES, "max_tokens": 900}

    def call() -> tuple[int, str | None]:
        answer = post_chat(proc, body, {"FC-Customer": "acme"})
        return answer.status, answer.error["code"] if answer.status != 200 else None

    try:
        for _ in range(4):  # only possible because each is settled to its small real usage
            assert call() == (200, None)
            time.sleep(0.2)  # the settle is written after the answer
        fake_openai.script(Reply(prompt_tokens=20, completion_tokens=900))
        assert call() == (200, None)  # really used 920
        time.sleep(0.2)
        assert call() == (429, "rate_limited")
    finally:
        assert proc.stop() == 0
