"""A client that does not read its stream costs the sidecar a bounded amount of memory
(issue 16: 200 unread streams took RSS to 607 MiB, not returned afterwards). The write waits
for the client, the upstream read waits for the write, and what a stalled stream holds is
freed when its client goes away."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import openai_config
from tests.procs import SidecarProcess, wait_until
from tests.support import CHAT, post_chat
from tests.upstreams.openai_fake import FakeOpenAI, Reply

STREAMS = 40
# What one stalled stream may hold, by construction: the upstream reader pauses at 256 KiB
# unread, plus one socket read (256 KiB) and the events parsed from it; a batch of 64 KiB and
# its encoded copy; the write buffer (64 KiB high-water, plus 64 KiB between two drains of
# aiohttp's writer, plus one batch): about 1.1 MiB, measured 0.5 to 0.8 MiB. Before the fix:
# 6 to 7 MiB (a batch of every event that had arrived, each re-encoded chunk holding 4 to 16
# KiB of orjson's untrimmed buffer, kept while the write waited).
PER_STREAM_MIB = 2.0
# a second round of unread streams reuses what the first freed: it may add this much
REUSE_SLACK_MIB = 0.25


def answer_longer_than_the_buffers() -> Reply:
    """An answer the kernel buffers between the fake and the sidecar cannot take whole (the
    fake's send buffer autotunes up to tcp_wmem's maximum): a stalled stream leaves the rest
    of it unsent."""
    wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    length = max(8_000_000, 2 * wmem_max)
    return Reply(content="x" * length, chunks=length // 1000)


def rss_mib(proc: SidecarProcess) -> float:
    assert proc.proc is not None
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_unread_streams(proc: SidecarProcess, count: int) -> list[socket.socket]:
    """`count` stream requests from clients that never read (a 4 KiB receive buffer)."""
    body = json.dumps(
        {"model": "fc:openai/gpt-4o-mini", "stream": True,
         "messages": [{"role": "user", "content": "hi"}]}
    ).encode()  # fmt: skip
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    clients = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", proc.port))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(head + body)
        clients.append(client)
    return clients


def stalled_rss_mib(proc: SidecarProcess, fake: FakeOpenAI, count: int) -> float:
    """The RSS once every stream has stalled: all requests upstream, no growth for 2 s."""
    wait_until(lambda: len(fake.received) == count, timeout=30)
    last, since = rss_mib(proc), time.monotonic()
    deadline = since + 60
    while time.monotonic() < deadline and time.monotonic() - since < 2:
        time.sleep(0.25)
        now = rss_mib(proc)
        if abs(now - last) > 1:
            last, since = now, time.monotonic()
    return rss_mib(proc)


def close(clients: list[socket.socket], fake: FakeOpenAI) -> None:
    """Close the clients, and give the sidecar time to drop each upstream answer it had not
    received whole (the fake records those as `disconnected`)."""
    for client in clients:
        client.close()
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: all(record.disconnected for record in fake.received), timeout=10)
    time.sleep(0.5)


def started(fake: FakeOpenAI, factory: Callable[..., SidecarProcess]) -> SidecarProcess:
    proc = factory(openai_config(fake.url))
    warm = {"model": "fc:openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    for stream in (False, True):  # the code paths of both answers loaded before the baseline
        assert post_chat(proc, {**warm, "stream": stream}).status == 200
    fake.on_model("gpt-4o-mini", answer_longer_than_the_buffers())
    fake.received.clear()
    time.sleep(0.5)
    return proc


def test_unread_streams_cost_a_bounded_memory_and_hold_back_the_upstream(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = started(fake_openai, sidecar_factory)
    idle = rss_mib(proc)

    clients = open_unread_streams(proc, STREAMS)
    stalled = stalled_rss_mib(proc, fake_openai, STREAMS)
    close(clients, fake_openai)

    assert stalled - idle < STREAMS * PER_STREAM_MIB, (idle, stalled)
    # no answer had left the upstream whole: its sending waited for the clients
    assert len(fake_openai.received) == STREAMS
    assert all(record.disconnected for record in fake_openai.received)


def test_the_memory_of_unread_streams_is_freed_when_their_clients_go_away(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    """Freed, so a second round reuses it instead of adding as much again (the allocator
    keeps freed memory for reuse rather than giving it back to the system at once)."""
    proc = started(fake_openai, sidecar_factory)
    peaks = []
    for _ in range(2):
        clients = open_unread_streams(proc, STREAMS)
        peaks.append(stalled_rss_mib(proc, fake_openai, STREAMS))
        close(clients, fake_openai)
        fake_openai.received.clear()

    assert peaks[1] - peaks[0] < STREAMS * REUSE_SLACK_MIB, peaks
