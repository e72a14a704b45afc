"""The HTTP/1.1 exchange of one upstream connection on a fake transport (as httpcore tests
its HTTP/1.1 code): bytes fed in as the network would, in any cut; no server, no socket."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.http1 import Connection, Response, Streamed, UpstreamProtocolError


class FakeTransport:
    """Records what is written; an abort closes the connection as a real transport would."""

    def __init__(self, protocol: Connection) -> None:
        self.protocol = protocol
        self.written = b""
        self.aborted = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written += data

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str) -> Any:
        return None


def connected() -> tuple[Connection, FakeTransport]:
    connection = Connection()
    transport = FakeTransport(connection)
    connection.connection_made(transport)  # type: ignore[arg-type]
    return connection, transport


async def exchange(*pieces: bytes, streaming: bool = False) -> tuple[Any, Connection]:
    connection, transport = connected()
    answer = connection.send(b"POST /v1 HTTP/1.1\r\n\r\n", b"{}", 5.0, streaming)
    assert transport.written == b"POST /v1 HTTP/1.1\r\n\r\n{}"
    for piece in pieces:
        connection.data_received(piece)
    return await asyncio.wait_for(answer, 1), connection


def cuts(raw: bytes) -> list[list[bytes]]:
    """The reply whole, byte by byte, and cut in two at every eighth byte."""
    return [[raw], [raw[i : i + 1] for i in range(len(raw))]] + [
        [raw[:at], raw[at:]] for at in range(1, len(raw), 8)
    ]


CONTENT_LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n"


@pytest.mark.parametrize("pieces", cuts(CONTENT_LENGTH) + cuts(CHUNKED))
async def test_a_body_in_any_cut_arrives_whole_and_the_connection_is_reusable(
    pieces: list[bytes],
) -> None:
    response, connection = await exchange(*pieces)
    assert isinstance(response, Response)
    assert (response.status, response.body) == (200, b"hello")
    assert connection.reusable()


async def test_an_interim_response_is_skipped() -> None:
    response, _ = await exchange(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + CONTENT_LENGTH)
    assert (response.status, response.body) == (200, b"hello")
    assert "Link" not in response.headers


async def test_a_body_delimited_by_the_close_ends_with_it() -> None:
    connection, _ = connected()
    answer = connection.send(b"POST / HTTP/1.1\r\n\r\n", b"", 5.0, False)
    connection.data_received(b"HTTP/1.1 200 OK\r\n\r\nhel")
    connection.data_received(b"lo")
    connection.connection_lost(None)
    response = await asyncio.wait_for(answer, 1)
    assert response.body == b"hello"
    assert not connection.reusable()


async def test_connection_close_is_not_reused() -> None:
    _, connection = await exchange(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    assert not connection.reusable()


async def test_a_close_before_the_body_ended_is_a_protocol_error() -> None:
    connection, _ = connected()
    answer = connection.send(b"POST / HTTP/1.1\r\n\r\n", b"", 5.0, False)
    connection.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel")
    connection.connection_lost(None)
    with pytest.raises(UpstreamProtocolError, match="closed before the response ended"):
        await asyncio.wait_for(answer, 1)


async def test_a_malformed_status_line_is_a_protocol_error_and_drops_the_connection() -> None:
    connection, transport = connected()
    answer = connection.send(b"POST / HTTP/1.1\r\n\r\n", b"", 5.0, False)
    connection.data_received(b"HTTP/1.1 OK\r\n\r\n")
    with pytest.raises(UpstreamProtocolError, match="unparseable"):
        await asyncio.wait_for(answer, 1)
    assert transport.aborted


async def test_bytes_while_idle_drop_the_connection() -> None:
    _, connection = await exchange(CONTENT_LENGTH)
    connection.release()
    connection.data_received(b"HTTP/1.1 200 OK\r\n")
    assert connection.closed


async def test_a_head_over_its_limit_fails_without_waiting_for_its_end() -> None:
    connection, transport = connected()
    answer = connection.send(b"POST / HTTP/1.1\r\n\r\n", b"", 5.0, False)
    connection.data_received(b"HTTP/1.1 200 OK\r\n")
    for _ in range(20):
        if transport.aborted:
            break
        connection.data_received(b"X-Pad: " + b"a" * 8000 + b"\r\n")
    with pytest.raises(UpstreamProtocolError, match="head over"):
        await asyncio.wait_for(answer, 1)
    assert transport.aborted


async def test_a_stream_hands_the_body_over_as_it_arrives() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    streamed, connection = await exchange(head, streaming=True)
    assert isinstance(streamed, Streamed) and streamed.status == 200
    streamed.body.configure(1.0, None, "identity")
    connection.data_received(b"3\r\nabc\r\n")
    assert await streamed.body.__anext__() == b"abc"
    connection.data_received(b"0\r\n\r\n")
    assert [piece async for piece in streamed.body] == []
    assert streamed.body.ended and connection.reusable()


async def test_no_answer_within_read_is_a_timeout() -> None:
    connection, _ = connected()
    answer = connection.send(b"POST / HTTP/1.1\r\n\r\n", b"", 0.05, False)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(answer, 1)
