"""One upstream connection: the request written in one piece, the response parsed by
httptools (llhttp) as bytes arrive, whole or handed over to a BodyReader at its head."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.http1.body import MAX_BODY_BYTES, BodyReader, Streamed, UpstreamProtocolError

if TYPE_CHECKING:
    from sidecar.http1.pool import Pool

# the kernel receive buffer of a connection once paused (the kernel doubles it): autotuned, it
# grows to megabytes while a fast stream is read, and would take that much more of the answer
PAUSED_RCVBUF_BYTES = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024  # of a response head: more is an upstream error, not memory
MAX_HEADERS = 100


@dataclass(slots=True)
class Response:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass(slots=True)
class Upload:
    """A request body that arrives in pieces (a pass-through upload), `length` bytes in all:
    sent as it comes, never held whole."""

    pieces: AsyncIterable[bytes]
    length: int


class Connection(asyncio.Protocol):
    """One TCP connection, one request at a time; httptools calls back as bytes arrive. The
    waiter is answered with the whole Response, or, for a streamed request, with a Streamed
    at the head whose BodyReader then takes the body."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.pool: Pool | None = None  # counted there from when it is open until it closes
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None  # the read timeout of the request
        self._streaming = False
        self._reader: BodyReader | None = None
        self._paused = False  # reading paused for the reader
        self._rcvbuf_bounded = False  # once paused: no longer autotuned, so never pooled again
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._body: list[bytes] = []
        self._size = 0
        self._done = False
        self._headers_done = False
        self._head_bytes = 0
        self._keep_alive = False
        self._write_paused = False  # the transport's buffer is full (asyncio flow control)
        self._drained: asyncio.Future[None] | None = None  # an upload waiting for room
        self._unfinished = False  # an upload ended before its body was all sent

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes while idle: the connection cannot be trusted
            self._abort()
            return
        if not self._headers_done:  # bytes of the head so far (checked before the next piece)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(UpstreamProtocolError(f"response head over {MAX_HEAD_BYTES} bytes"))
                self._abort()
                return
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"unparseable response: {exc}"))
            self._abort()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()
        self._wake_writer(exc or ConnectionResetError("connection closed"))
        if self._waiter is None or self._done:
            return
        if self._headers_done and not {"Content-Length", "Transfer-Encoding"} & set(self._headers):
            self.on_message_complete()  # a body delimited by the close (HTTP/1.0 style) ends here
            return
        self._fail(UpstreamProtocolError("connection closed before the response ended" + _why(exc)))

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        if len(self._headers) > MAX_HEADERS:
            self._fail(UpstreamProtocolError(f"response with over {MAX_HEADERS} headers"))
            self._abort()
            return
        status = self._parser.get_status_code()
        if self._streaming and not 100 <= status < 200:
            streamed = Streamed(status, CIMultiDictProxy(self._headers), self)
            self._reader = streamed.body
            self._resolve(streamed)

    def on_body(self, body: bytes) -> None:
        if self._reader is not None:
            self._reader.feed(body)
            return
        self._size += len(body)
        if self._size > MAX_BODY_BYTES:
            self._fail(UpstreamProtocolError(f"response body over {MAX_BODY_BYTES} bytes"))
            self._abort()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # 100 Continue, 103 Early Hints: not
            self._headers = CIMultiDict()  # the answer; the final response follows
            self._body, self._size, self._headers_done = [], 0, False
            return
        self._done = True
        self._keep_alive = self._parser.should_keep_alive()  # only valid inside the callback
        if self._reader is not None:
            self._reader.end()
        else:
            body = b"".join(self._body)
            self._resolve(Response(status, CIMultiDictProxy(self._headers), body))

    # -- use
    def send(self, head: bytes, body: bytes, read: float, streaming: bool) -> asyncio.Future[Any]:
        """Write the request; the future fails with TimeoutError `read` seconds on (one timer
        handle: cheaper than an asyncio.timeout block per request)."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        self._timer = loop.call_later(read, self._time_out, read)  # cancelled once answered
        self._streaming = streaming
        self._reader = None
        self._headers = CIMultiDict()
        self._body = []
        self._size = 0
        self._done = False
        self._headers_done = False
        self._head_bytes = 0
        self.transport.write(head + body)
        return waiter

    async def upload(self, head: bytes, body: Upload, read: float) -> asyncio.Future[Any]:
        """`send` for a streamed request (an `Upload`): the head at once, then each piece as
        it arrives, waiting while the transport's buffer is full (up to `read` seconds for the
        upstream to take more); the read timeout of the answer starts once the body is sent.
        An answer before then (an upstream refusing the body early) ends the upload, and the
        connection is not reused."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        self._streaming = True
        self._reader = None
        self._headers = CIMultiDict()
        self._body = []
        self._size = 0
        self._done = False
        self._headers_done = False
        self._head_bytes = 0
        self._unfinished = True
        self.transport.write(head)
        sent = 0
        try:
            async for piece in body.pieces:
                if waiter.done() or self.closed:
                    return waiter
                sent += len(piece)
                if sent > body.length:
                    raise UpstreamProtocolError(f"the upload is over its {body.length} bytes")
                self.transport.write(piece)
                if self._write_paused:
                    async with asyncio.timeout(read):
                        await self._room(loop)
            if sent != body.length:
                raise UpstreamProtocolError(f"the upload ended after {sent} of {body.length} bytes")
        except BaseException:
            waiter.cancel()  # nobody will wait for this answer (the caller drops the connection)
            raise
        self._unfinished = False
        if not waiter.done():
            self._timer = loop.call_later(read, self._time_out, read)
        return waiter

    async def _room(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._write_paused:
            if self.closed:
                raise ConnectionResetError("connection closed during the upload")
            self._drained = loop.create_future()
            await self._drained

    def _wake_writer(self, exc: Exception | None) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            if exc is None:
                drained.set_result(None)
            else:
                drained.set_exception(exc)

    def reusable(self) -> bool:
        """After a complete response: whether the connection may carry another request."""
        return (
            self._done
            and not self.closed
            and self._keep_alive
            and not self._rcvbuf_bounded
            and not self._unfinished
        )

    def release(self) -> None:
        self._waiter = None
        self._reader = None  # the parser goes on with the next response (llhttp keeps alive)
        if self._paused:  # a stream's reader fell behind just as its body ended
            self._paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    def pause_reading(self, reader: BodyReader) -> None:
        if reader is self._reader and not self._paused and not self.closed:
            self._paused = True
            assert self.transport is not None
            self.transport.pause_reading()
            if not self._rcvbuf_bounded:
                self._rcvbuf_bounded = True
                sock = self.transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PAUSED_RCVBUF_BYTES)

    def resume_reading(self, reader: BodyReader) -> None:
        if reader is self._reader and self._paused and not self.closed:
            self._paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    def _resolve(self, result: Response | Streamed) -> None:
        self._cancel_timer()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    def _fail(self, exc: Exception) -> None:
        self._cancel_timer()
        if self._reader is not None:
            self._reader.fail(exc)
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    def _time_out(self, read: float) -> None:
        self._timer = None
        self._fail(TimeoutError(f"no response within {read} s"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _abort(self) -> None:
        """Drop the connection (its waiter's timer too: a cancelled caller leaves it armed)."""
        self._closed()
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    def _closed(self) -> None:
        if not self.closed:
            self.closed = True
            if self.pool is not None:
                self.pool.lost()


def _why(exc: Exception | None) -> str:
    return f": {exc}" if exc else ""
