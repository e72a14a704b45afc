"""Hostile connections (issue 16): header, body and idle deadlines, the connection cap of each
listener, and aiohttp's parser rejections answered in the OpenAI envelope."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import openai_config
from tests.procs import SidecarProcess, wait_until
from tests.support import HELLO, metric, metric_samples, module_sidecar, request, sdk
from tests.upstreams.openai_fake import FakeOpenAI

DEADLINES = {"header_timeout": 1, "body_timeout": 1, "idle_timeout": 3}
CAP = 20
MARK = b"SECRETMARK"  # in the offending header: an answer must not quote it back
CAP_LINE = "its cap (limits.max_connections)"
BELOW_LINE = "below its cap again"


@pytest.fixture(scope="module")
def deadlines(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    """A sidecar whose header and body deadlines are 1 s and whose idle timeout is 3 s."""
    config = openai_config(_openai_server.url, limits=DEADLINES)
    yield from module_sidecar(tmp_path_factory.mktemp("deadlines"), config)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def is_open(sock: socket.socket) -> bool:
    """Whether the server has not closed `sock` (nothing it sent is consumed)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:  # reset
        return False
    finally:
        sock.setblocking(True)


def closes_within(socks: list[socket.socket], seconds: float, poke: bytes = b"") -> float:
    """Seconds until the server closed every one of `socks` (sending `poke` on each every
    0.1 s meanwhile); fails if some are still open after `seconds`."""
    started = time.monotonic()
    still_open = set(socks)
    while still_open and time.monotonic() - started < seconds:
        for sock in list(still_open):
            if poke:
                with contextlib.suppress(OSError):
                    sock.sendall(poke)
            if not is_open(sock):
                still_open.discard(sock)
        time.sleep(0.1)
    assert not still_open, f"{len(still_open)} of {len(socks)} still open after {seconds} s"
    return time.monotonic() - started


def response(sock: socket.socket) -> tuple[int, http.client.HTTPMessage, bytes]:
    answer = http.client.HTTPResponse(sock)
    answer.begin()
    return answer.status, answer.headers, answer.read()


def error_code(headers: http.client.HTTPMessage, body: bytes) -> str:
    assert headers["Content-Type"].startswith("application/json"), (headers, body)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return str(error["code"])


def timeouts(proc: SidecarProcess, phase: str) -> float:
    return metric(
        metric_samples(proc), "ringside_connection_timeouts_total", listener="api", phase=phase
    )


def test_silent_connections_are_closed_at_the_header_deadline(
    deadlines: SidecarProcess,
) -> None:
    before = timeouts(deadlines, "header")
    socks = [connect(deadlines.port) for _ in range(20)]
    assert closes_within(socks, 4) < 2.5
    assert timeouts(deadlines, "header") - before == 20


def test_slowloris_headers_are_closed_at_the_header_deadline(deadlines: SidecarProcess) -> None:
    socks = [connect(deadlines.port) for _ in range(20)]
    for sock in socks:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nX-Slow")
    # one more byte of the header name every 0.1 s: trickling does not extend the deadline
    assert closes_within(socks, 4, poke=b"w") < 2.5


def test_next_request_on_a_keep_alive_connection_has_the_header_deadline(
    deadlines: SidecarProcess,
) -> None:
    sock = connect(deadlines.port)
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert response(sock)[0] == 200
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Slow")
    # within the header deadline (1 s), well before the idle timeout (3 s)
    assert closes_within([sock], 4, poke=b"w") < 2.0


def test_idle_keep_alive_connection_outlives_the_header_deadline_until_idle_timeout(
    deadlines: SidecarProcess,
) -> None:
    sock = connect(deadlines.port)
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert response(sock)[0] == 200
    answered = time.monotonic()
    time.sleep(1.8)  # past the header deadline: an idle keep-alive connection is not closed
    assert is_open(sock)
    closes_within([sock], 4)
    assert 2.5 < time.monotonic() - answered < 4.5


def test_body_that_never_completes_is_answered_408_and_closed(
    deadlines: SidecarProcess,
) -> None:
    before = timeouts(deadlines, "body")
    sock = connect(deadlines.port)
    started = time.monotonic()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        b'{"model": "fc:openai/gpt-4o-mini", '
    )
    status, headers, body = response(sock)
    assert status == 408
    assert error_code(headers, body) == "request_timeout"
    assert headers["Connection"] == "close"
    assert time.monotonic() - started < 2.5
    closes_within([sock], 2)
    assert timeouts(deadlines, "body") - before == 1


def test_body_sent_in_pieces_within_the_deadline_is_served(
    deadlines: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    body = json.dumps({"model": "fc:openai/gpt-4o-mini", "messages": HELLO}).encode()
    sock = connect(deadlines.port)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    for start in range(0, len(body), 20):  # the body straddles reads, in ≈ 0.4 s
        time.sleep(0.05)
        sock.sendall(body[start : start + 20])
    status, _headers, answer = response(sock)
    assert status == 200, answer
    assert json.loads(answer)["object"] == "chat.completion"


def test_connections_over_the_cap_are_refused_while_probes_are_served(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(openai_config(fake_openai.url, limits={"max_connections": CAP}))
    held = [connect(proc.port) for _ in range(CAP)]  # silent: they hold the cap
    wait_until(
        lambda: metric(metric_samples(proc), "ringside_open_connections", listener="api") == CAP
    )
    extra = [connect(proc.port) for _ in range(5)]
    for sock in extra:
        status, headers, body = response(sock)
        assert status == 503
        assert error_code(headers, body) == "server_busy"
        assert headers["Retry-After"] == "1"
    closes_within(extra, 2)
    # the admin listener has a cap of its own: the probes answer while the api one is full
    assert request(proc.admin_url, "GET", "/healthz").status == 200
    assert request(proc.admin_url, "GET", "/readyz").status == 200
    samples = metric_samples(proc)
    assert metric(samples, "ringside_connections_refused_total", listener="api") == 5
    assert metric(samples, "ringside_open_connections", listener="api") == CAP
    assert proc.stderr().count(CAP_LINE) == 1  # one line for the whole episode

    for sock in held:
        sock.close()
    wait_until(lambda: BELOW_LINE in proc.stderr(), timeout=5)
    answer = sdk(proc).chat.completions.create(model="fc:openai/gpt-4o-mini", messages=HELLO)
    assert answer.choices[0].message.content
    assert proc.stderr().count(CAP_LINE) == 1
    assert proc.stderr().count(BELOW_LINE) == 1


def _header_lines(count: int) -> bytes:
    return b"".join(b"X-H%d: %s\r\n" % (index, MARK) for index in range(count))


REJECTED = {
    "header over 8190 bytes": b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Big: "
    + MARK
    + b"A" * 9000
    + b"\r\n\r\n",
    "1000 headers": b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n"
    + _header_lines(1000)
    + b"\r\n",
    "NUL in a header": b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Nul: SECRET\x00"
    + MARK
    + b"\r\n\r\n",
    "bare LF": b"GET /v1/models HTTP/1.1\r\nHost: localhost\nX-Lf: " + MARK + b"\r\n\r\n",
    "Content-Length with Transfer-Encoding": b"POST /v1/chat/completions HTTP/1.1\r\n"
    b"Host: localhost\r\nX-Mark: " + MARK + b"\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("raw", list(REJECTED.values()), ids=list(REJECTED))
@pytest.mark.parametrize("listener", ["api", "admin"])
def test_parser_rejection_is_400_in_the_envelope_without_the_header(
    deadlines: SidecarProcess, raw: bytes, listener: str
) -> None:
    sock = connect(deadlines.port if listener == "api" else deadlines.admin_port)
    sock.sendall(raw)
    status, headers, body = response(sock)
    assert status == 400
    assert error_code(headers, body) == "invalid_request"
    assert MARK not in body and b"SECRET" not in body
    closes_within([sock], 2)


def test_parser_rejections_are_not_logged(deadlines: SidecarProcess) -> None:
    sock = connect(deadlines.port)
    sock.sendall(REJECTED["NUL in a header"])
    assert response(sock)[0] == 400
    assert "Error handling request" not in deadlines.stderr()
    assert "SECRET" not in deadlines.stderr()
