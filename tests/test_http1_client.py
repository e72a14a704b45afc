"""The upstream client in-process (sidecar/http1/): at most `max_connections` per origin,
waiters served first come first served, a wait past the pool timeout an upstream timeout;
bounded response heads; against small HTTP/1.1 servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import pytest

from sidecar.http1 import Http1Client, UpstreamProtocolError
from sidecar.http1.dial import Dialer

REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class CountingServer:
    """Answers each request after `delay` seconds, keep-alive; counts connections."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.connections = 0
        self.most_at_once = 0
        self._open = 0
        self.url = ""

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/x"
        return server

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._open += 1
        self.most_at_once = max(self.most_at_once, self._open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                await asyncio.sleep(self.delay)
                writer.write(REPLY)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._open -= 1
            writer.close()


@pytest.fixture
async def client() -> AsyncIterator[Http1Client]:
    found = Http1Client(environ={})
    yield found
    found.close()


async def serve(delay: float) -> tuple[CountingServer, asyncio.Server]:
    upstream = CountingServer(delay)
    return upstream, await upstream.start()


async def test_requests_beyond_max_connections_wait_for_a_connection(
    client: Http1Client,
) -> None:
    upstream, server = await serve(0.05)
    target = client.egress(max_connections=2, wait_seconds=5).target(upstream.url)
    answers = await asyncio.gather(*(client.request(target, {}, b"{}", 1.0, 5.0) for _ in range(6)))
    assert [a.status for a in answers] == [200] * 6
    assert upstream.connections == 2 and upstream.most_at_once == 2
    server.close()


async def test_a_wait_past_the_pool_timeout_is_an_upstream_timeout(
    client: Http1Client,
) -> None:
    upstream, server = await serve(1.0)
    target = client.egress(max_connections=1, wait_seconds=0.1).target(upstream.url)
    first = asyncio.create_task(client.request(target, {}, b"{}", 1.0, 5.0))
    await asyncio.sleep(0.05)
    with pytest.raises(TimeoutError, match="max_connections"):
        await client.request(target, {}, b"{}", 1.0, 5.0)
    assert (await first).status == 200
    assert upstream.connections == 1
    server.close()


async def test_a_closed_connection_frees_its_slot_for_a_waiter(client: Http1Client) -> None:
    upstream, server = await serve(0.3)
    target = client.egress(max_connections=1, wait_seconds=5).target(upstream.url)
    first = asyncio.create_task(client.request(target, {}, b"{}", 1.0, 0.1))  # times out
    second = asyncio.create_task(client.request(target, {}, b"{}", 1.0, 5.0))
    with pytest.raises(TimeoutError):
        await first
    assert (await second).status == 200  # on a new connection, once the first was dropped
    assert upstream.connections == 2
    assert target.pool.open == 1
    server.close()


async def test_an_ipv6_literal_is_bracketed_in_host(client: Http1Client) -> None:
    target = client.target("http://[::1]:8080/v1/x")
    head = client._head("POST", target, {}, 2)
    assert b"\r\nHost: [::1]:8080\r\n" in head


async def raw_server(reply: bytes) -> tuple[str, asyncio.Server]:
    """Answers any request with `reply`, then waits (a head that never ends hangs here)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await asyncio.sleep(10)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/x", server


async def test_a_response_with_too_many_headers_is_an_upstream_error(client: Http1Client) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % n for n in range(101))
    url, server = await raw_server(b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 0\r\n\r\n")
    with pytest.raises(UpstreamProtocolError, match="over 100 headers"):
        await client.request(client.target(url), {}, b"{}", 1.0, 5.0)
    server.close()


async def test_an_endless_response_head_is_an_upstream_error_not_a_hang(
    client: Http1Client,
) -> None:
    url, server = await raw_server(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 300_000)
    with pytest.raises(UpstreamProtocolError, match="head over"):
        await client.request(client.target(url), {}, b"{}", 1.0, 5.0)
    server.close()


# -- dialing: happy eyeballs and the DNS cache


def hanging_address() -> tuple[socket.socket, list[socket.socket], tuple[str, int]]:
    """An IPv6 loopback address whose connects hang: a listener that never accepts, its
    backlog full (the kernel then drops new SYNs, as a firewall would)."""
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.bind(("::1", 0))
    listener.listen(0)
    address = listener.getsockname()[:2]
    fillers = []
    for _ in range(2):
        filler = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(address)
        fillers.append(filler)
    return listener, fillers, address


async def test_an_unreachable_first_address_costs_the_stagger_not_the_timeout() -> None:
    upstream, server = await serve(0)
    port = int(upstream.url.split(":")[2].split("/")[0])
    listener, fillers, hanging = hanging_address()
    dialer = Dialer(stagger=0.1)
    started = time.monotonic()
    async with asyncio.timeout(3):
        sock = await dialer.race(
            [(socket.AF_INET6, hanging), (socket.AF_INET, ("127.0.0.1", port))], "test"
        )
    assert sock.getpeername() == ("127.0.0.1", port)
    assert time.monotonic() - started < 1.0
    sock.close()
    for each in (listener, *fillers):
        each.close()
    server.close()


async def test_a_fresh_answer_is_reused_and_a_stale_one_renewed_off_the_path() -> None:
    dialer = Dialer(ttl=60)
    first = await dialer.addresses("localhost", 80)
    assert await dialer.addresses("localhost", 80) is first  # no second lookup
    dialer.ttl = 0  # now stale: served as is while renewed
    assert await dialer.addresses("localhost", 80) is first
    await asyncio.sleep(0.2)
    dialer.ttl = 60
    renewed = await dialer.addresses("localhost", 80)
    assert renewed is not first and renewed == first
