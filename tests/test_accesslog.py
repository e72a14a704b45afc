"""The access log: one JSON line per request on the sidecar's stdout, ids and numbers only."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import PROVIDER_KEY, openai_config
from tests.procs import SidecarProcess, wait_until
from tests.support import HELLO, module_sidecar, post_chat
from tests.upstreams.openai_fake import FakeOpenAI, Reply

MINI = "fc:openai/gpt-4o-mini"
CLIENT_KEY = "rk_client_secret_never_logged"
PROMPT = "my secret prompt about the merger"
COMPLETION = "a confidential completion text"


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    digest = hashlib.sha256(CLIENT_KEY.encode()).hexdigest()
    config = openai_config(
        _openai_server.url, keys=[{"id": "app1", "sha256": digest, "developer": "alice"}]
    )
    yield from module_sidecar(tmp_path_factory.mktemp("accesslog"), config)


def auth(request_id: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {CLIENT_KEY}", "X-Request-Id": request_id, **extra}


def log_lines(proc: SidecarProcess, request_id: str) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]]:
        return [r for r in proc.access_log() if r["request_id"] == request_id]

    wait_until(found)
    return found()


def test_one_json_line_per_request(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    post_chat(gateway, {"model": MINI, "messages": HELLO}, auth("log-one-1"))
    post_chat(gateway, {"model": MINI, "messages": HELLO}, auth("log-one-2"))
    assert len(log_lines(gateway, "log-one-1")) == 1
    assert len(log_lines(gateway, "log-one-2")) == 1
    for line in gateway.stdout().splitlines():
        json.loads(line)  # stdout holds nothing but JSON lines


def test_line_describes_a_success(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Reply(prompt_tokens=100, completion_tokens=20))
    post_chat(gateway, {"model": MINI, "messages": HELLO}, auth("log-ok", **{"FC-Customer": "c9"}))
    line = log_lines(gateway, "log-ok")[0]
    assert line["status"] == 200
    assert (line["key_id"], line["dev"], line["customer"]) == ("app1", "alice", "c9")
    assert line["refs_tried"] == [MINI]
    assert line["ref_used"] == MINI
    assert (line["tokens_in"], line["tokens_out"]) == (100, 20)
    assert line["cost_usd"] == pytest.approx((100 * 0.15 + 20 * 0.60) / 1e6)
    assert line["error_code"] is None
    assert line["fallback"] is False
    assert line["latency_ms"] > 0
    assert line["client_ip"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("send", "status", "code"),
    [
        (lambda gw: post_chat(gw, b"nope", auth("log-err-400")), 400, "invalid_request"),
        (
            lambda gw: post_chat(
                gw, {"model": MINI, "messages": HELLO}, {"X-Request-Id": "log-err-401"}
            ),
            401,
            "invalid_api_key",
        ),
    ],
    ids=["400", "401"],
)
def test_line_describes_an_error(
    gateway: SidecarProcess,
    fake_openai: FakeOpenAI,
    send: Callable[[SidecarProcess], Any],
    status: int,
    code: str,
) -> None:
    answer = send(gateway)
    line = log_lines(gateway, answer.headers["X-Request-Id"])[0]
    assert (line["status"], line["error_code"]) == (status, code)


def test_line_has_no_secrets_prompts_or_completions(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content=COMPLETION), Reply(content=COMPLETION))
    body = {"model": MINI, "messages": [{"role": "user", "content": PROMPT}]}
    post_chat(gateway, body, auth("log-secret-1"))
    post_chat(gateway, {**body, "stream": True}, auth("log-secret-2"))
    post_chat(gateway, body, {"Authorization": "Bearer rk_wrong_secret", "X-Request-Id": "log-s3"})
    log_lines(gateway, "log-secret-2")
    log_lines(gateway, "log-s3")
    output = gateway.stdout() + gateway.stderr()
    for secret in (CLIENT_KEY, "rk_wrong_secret", PROVIDER_KEY, PROMPT, COMPLETION, "merger"):
        assert secret not in output


def test_access_log_can_be_turned_off(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(openai_config(fake_openai.url, access_log={"enabled": False}))
    answer = post_chat(proc, {"model": MINI, "messages": HELLO})
    assert answer.status == 200
    proc.stop()
    assert proc.access_log() == []
