"""SIGTERM drains (SPEC 8, sidecar/shutdown.py): /readyz fails at once, new requests are served
for `shutdown.delay_seconds`, then new connections are refused while what is in progress gets
`shutdown.grace_seconds`; what outlives the grace is ended with an error (a stream: an SSE event)
and charged what it produced, its hold released and its record written; the exit code is 0."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROVIDER_KEY
from tests.procs import SidecarProcess, wait_until
from tests.support import CHAT, HELLO, ringside
from tests.test_budget import ADMIN_ENV, PRICED, budget_config, nano, usage_of
from tests.upstreams.openai_fake import FakeOpenAI, Reply

MINI = "fc:openai/gpt-4o-mini"
# a stream that lasts 4 s: 40 pieces of 10 characters, 0.1 s apart
LONG = Reply(content="0123456789" * 40, chunks=40, chunk_delay=0.1)


def get(proc: SidecarProcess, base: str, path: str) -> tuple[int, str | None]:
    """Status and `Connection` header of a GET on a fresh connection."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status, response.headers.get("Connection")
    finally:
        conn.close()


def post(proc: SidecarProcess, body: dict[str, Any]) -> tuple[int, str | None, dict[str, Any]]:
    """Status, `Connection` header and JSON body of a chat request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=15)
    try:
        conn.request("POST", CHAT, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.headers.get("Connection"), json.loads(response.read())
    finally:
        conn.close()


class Stream(threading.Thread):
    """A streamed chat request read event by event in the background, its raw body known (the
    sidecar estimates its prompt tokens from its length)."""

    def __init__(self, proc: SidecarProcess, headers: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.payload = json.dumps({"model": PRICED, "messages": HELLO, "stream": True}).encode()
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.events: list[str] = []
        self.flowing = threading.Event()  # the first content arrived
        self.failure: BaseException | None = None

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.proc.port, timeout=15)
        try:
            conn.request("POST", CHAT, self.payload, self.headers)
            response = conn.getresponse()
            assert response.status == 200, response.read()
            for line in response:
                if line.startswith(b"data: "):
                    self.events.append(line[6:].strip().decode())
                    if self.content():
                        self.flowing.set()
        except BaseException as exc:
            self.failure = exc
        finally:
            conn.close()
            self.flowing.set()

    def content(self) -> str:
        pieces = []
        for event in self.events:
            if event != "[DONE]":
                for choice in json.loads(event).get("choices", ()):
                    pieces.append(choice["delta"].get("content") or "")
        return "".join(pieces)

    def ended(self, timeout: float) -> list[str]:
        self.join(timeout)
        assert not self.is_alive(), "the stream did not end"
        assert self.failure is None, self.failure
        return self.events


def shutdown_config(fake_openai: FakeOpenAI, tmp_path: Path, **shutdown: float) -> dict[str, Any]:
    """The priced model on sqlite, `shutdown` as given, customer `acme` with a $1 budget whose
    holds outlive the test (reservation_ttl an hour) unless settled."""
    storage = {"backend": "sqlite", "sqlite_path": str(tmp_path / "r.db"), "reservation_ttl": 3600}
    config = budget_config(fake_openai.url, storage, acme=1.0)
    config["shutdown"] = shutdown
    return config


def terminate(proc: SidecarProcess, sig: int = signal.SIGTERM) -> float:
    assert proc.proc is not None
    proc.proc.send_signal(sig)
    return time.monotonic()


def exit_code(proc: SidecarProcess, timeout: float) -> int:
    assert proc.proc is not None
    try:
        return proc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {timeout} s later:\n{proc.stderr()}") from None


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_readyz_fails_at_once_while_new_requests_are_served_through_the_delay(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    proc = sidecar_factory(shutdown_config(fake_openai, tmp_path, delay_seconds=2))

    sent = terminate(proc)
    assert wait_until(lambda: get(proc, proc.admin_url, "/readyz")[0] == 503, timeout=0.5)
    status, connection, _ = post(proc, {"model": MINI, "messages": HELLO})

    assert (status, connection) == (200, "close")  # served; the client reconnects elsewhere
    assert time.monotonic() - sent < 2
    assert get(proc, proc.url, "/v1/models") == (200, "close")
    assert exit_code(proc, 5) == 0
    assert time.monotonic() - sent >= 2  # the listener served through the delay


def test_after_the_delay_new_connections_are_refused_and_idle_ones_closed(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    fake_openai.on_model("priced", LONG)
    config = shutdown_config(fake_openai, tmp_path, delay_seconds=0.5, grace_seconds=3)
    proc = sidecar_factory(config)
    idle = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=5)
    idle.request("GET", "/v1/models")
    assert idle.getresponse().read()  # a keep-alive connection, idle from now on
    stream = Stream(proc)
    stream.start()
    assert stream.flowing.wait(5)  # keeps the process running past the delay

    sent = terminate(proc)
    assert not refused(proc.port)  # during the delay
    assert wait_until(lambda: refused(proc.port), timeout=1.5)
    assert idle.sock is not None
    idle.sock.settimeout(1.5)
    assert idle.sock.recv(1) == b""  # closed by the sidecar
    assert 0.5 <= time.monotonic() - sent < 2.5
    idle.close()
    assert stream.is_alive()  # what was in progress goes on
    assert exit_code(proc, 5) == 0


def test_a_stream_in_flight_at_sigterm_finishes_within_the_grace_and_the_exit_is_0(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    fake_openai.on_model("priced", Reply(content="0123456789" * 15, chunks=15, chunk_delay=0.1))
    proc = sidecar_factory(
        shutdown_config(fake_openai, tmp_path, delay_seconds=0, grace_seconds=10)
    )
    stream = Stream(proc)
    stream.start()
    assert stream.flowing.wait(5)

    sent = terminate(proc)
    events = stream.ended(5)

    assert events[-1] == "[DONE]"
    assert stream.content() == "0123456789" * 15  # every chunk, none cut
    assert exit_code(proc, 5) == 0
    assert time.monotonic() - sent < 5  # right after the stream, not at the grace's end


def test_a_stream_outliving_the_grace_ends_with_an_error_event_and_is_charged_what_it_streamed(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    fake_openai.on_model("priced", LONG)
    config = shutdown_config(fake_openai, tmp_path, delay_seconds=0, grace_seconds=1)
    proc = sidecar_factory(config, ADMIN_ENV)
    stream = Stream(proc, {"FC-Customer": "acme"})
    stream.start()
    assert stream.flowing.wait(5)

    sent = terminate(proc)
    events = stream.ended(5)
    code = exit_code(proc, 5)
    took = time.monotonic() - sent

    error = json.loads(events[-1])["error"]
    assert (error["code"], error["type"]) == ("server_shutting_down", "service_unavailable_error")
    assert "shutdown.grace_seconds" in error["message"]
    assert "[DONE]" not in events
    assert code == 0
    assert 1 <= took < 2.5
    streamed = len(stream.content())
    assert 0 < streamed < len(LONG.content)
    # charged as a client that left would be: the prompt estimate (a token per 4 body bytes)
    # and a token per 4 characters produced; $1 and $2 per million tokens
    prompt, completion = len(stream.payload) // 4, max(1, streamed // 4)
    charge = prompt * 1000 + completion * 2000
    after = sidecar_factory(config, ADMIN_ENV)  # the same sqlite file
    report = usage_of(after, "acme")
    assert nano(report["spent_usd"]) == nano(report["cost_usd"]) == charge
    assert report["reserved_usd"] == 0  # the hold was settled, not left to expire
    assert (report["requests"], report["errors"]) == (1, 1)
    assert report["tokens"]["output"] == completion


def test_a_request_unanswered_at_the_end_of_the_grace_gets_a_503(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    fake_openai.on_model("priced", Reply(delay=10))
    proc = sidecar_factory(
        shutdown_config(fake_openai, tmp_path, delay_seconds=0, grace_seconds=0.5)
    )
    answers: list[tuple[int, str | None, dict[str, Any]]] = []
    slow = threading.Thread(
        target=lambda: answers.append(post(proc, {"model": PRICED, "messages": HELLO}))
    )
    slow.start()
    wait_until(lambda: fake_openai.received, 5)

    terminate(proc)
    slow.join(5)

    assert exit_code(proc, 5) == 0
    [(status, connection, body)] = answers
    assert (status, connection, body["error"]["code"]) == (503, "close", "server_shutting_down")
    assert wait_until(lambda: fake_openai.received[0].disconnected, 2)  # upstream call cancelled


def test_sigint_skips_the_delay(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    proc = sidecar_factory(shutdown_config(fake_openai, tmp_path, delay_seconds=30))

    sent = terminate(proc, signal.SIGINT)

    assert exit_code(proc, 5) == 0
    assert time.monotonic() - sent < 5


def test_workers_drain_and_the_supervisor_exits_0(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    fake_openai.on_model("priced", LONG)
    config = shutdown_config(fake_openai, tmp_path, delay_seconds=0, grace_seconds=1)
    proc = SidecarProcess(
        config, {"TEST_OPENAI_KEY": PROVIDER_KEY}, str(tmp_path), extra_args=["--workers", "2"]
    ).start()
    try:
        stream = Stream(proc)
        stream.start()
        assert stream.flowing.wait(5)

        sent = terminate(proc)
        events = stream.ended(5)
        assert exit_code(proc, 5) == 0
    finally:
        proc.stop()
    assert json.loads(events[-1])["error"]["code"] == "server_shutting_down"
    assert time.monotonic() - sent < 3.5


# -- the configuration -------------------------------------------------------------------------

CONFIG = "storage: {backend: memory}\nproviders: {m: {kind: mock}}\n"


def test_delay_defaults_to_5_seconds_in_a_kubernetes_pod_and_to_0_elsewhere() -> None:
    from sidecar.settings import parse_settings

    pod = parse_settings(CONFIG, "c.yaml", {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}).shutdown
    laptop = parse_settings(CONFIG, "c.yaml", {}).shutdown
    assert (pod.delay_seconds, pod.grace_seconds) == (5, 20)
    assert (laptop.delay_seconds, laptop.grace_seconds) == (0, 20)


def test_limits_drain_seconds_is_read_as_the_grace_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG + "limits: {drain_seconds: 7}\n")

    result = ringside("check-config", str(path))

    assert result.returncode == 0, result.stderr
    assert f"{path}:3: limits.drain_seconds: deprecated: read as shutdown.grace_seconds (7)" in (
        result.stderr
    )
    from sidecar.settings import load_settings

    assert load_settings(str(path)).shutdown.grace_seconds == 7


def test_limits_drain_seconds_beside_grace_seconds_is_ignored_with_a_warning(
    tmp_path: Path,
) -> None:
    from sidecar.settings import load_settings

    path = tmp_path / "c.yaml"
    path.write_text(CONFIG + "limits: {drain_seconds: 7}\nshutdown: {grace_seconds: 3}\n")

    settings = load_settings(str(path))

    assert settings.shutdown.grace_seconds == 3
    assert any("drain_seconds: deprecated and ignored" in w for w in settings.warnings)


@pytest.mark.parametrize("field", ["delay_seconds", "grace_seconds"])
def test_a_negative_shutdown_time_is_refused(tmp_path: Path, field: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG + f"shutdown: {{{field}: -1}}\n")

    result = ringside("check-config", str(path))

    assert result.returncode != 0
    assert f"shutdown.{field}" in result.stderr
