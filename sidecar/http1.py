"""A lean keep-alive HTTP/1.1 client for every upstream call, whole or streamed.

aiohttp's ClientSession costs about 0.2 ms of CPU per request here (request and response
objects, tracing hooks, cookie jar, timers), measured at more than half of a bare
aiohttp forwarder's whole cost. A provider call needs much less: write one request, read one
response. This module does only that: a pool of connections per origin, the request written
in one piece, the response parsed by httptools (llhttp, the parser of Node.js and uvicorn:
status line, headers, chunked and content-length bodies). `request` returns the whole body
(capped at MAX_BODY_BYTES); `stream` returns at the response head and hands the body over as
it arrives (a BodyReader), pausing the socket while the reader is behind (and bounding the
kernel's receive buffer from then on: what a stalled stream holds is small on both sides).

Timeouts follow the provider's: `connect` for the TCP (and TLS) handshake, `read` from the
request written to the response complete (streamed: to the head, then between two pieces of
the body), `total` over everything, a stream's body included. A connection is reused only
after a complete response that allows keep-alive (and never after a pause); one the server
closed while idle is dropped when the close arrives, and one idle for KEEPALIVE_SECONDS is
closed. A failed request is never sent again here. Upstream URLs come from the config only.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_IDLE_PER_ORIGIN = 256
KEEPALIVE_SECONDS = 15.0  # an idle connection older than this is closed, not reused (as aiohttp)
PAUSE_AT_BYTES = 256 * 1024  # a stream's unread body above this pauses the socket
RESUME_AT_BYTES = 64 * 1024
# the kernel receive buffer of a connection once paused (the kernel doubles it): autotuned, it
# grows to megabytes while a fast stream is read, and would take that much more of the answer
PAUSED_RCVBUF_BYTES = 64 * 1024


class UpstreamProtocolError(ConnectionError):
    """The upstream broke HTTP/1.1 or closed the connection before the response ended."""


@dataclass(frozen=True, slots=True, eq=False)
class Origin:
    """Equal by identity, so cheap as a dict key: Http1Client.target makes one per origin."""

    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, eq=False)
class Target:
    """A URL split once (at config load), with the request head that never changes. Equal
    by identity: Http1Client.target makes one per URL."""

    origin: Origin
    path: bytes

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(Origin(parts.scheme, parts.hostname, port), path.encode("ascii"))


@dataclass(slots=True)
class Response:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


class BodyReader:
    """A streamed response's body: `async for piece in reader` yields the bytes that arrived
    since the last piece (decoded when the server compressed anyway), then ends with the body.
    A wait longer than `read`, or past the `total` deadline, raises TimeoutError."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self._pieces: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._ended = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[bool] | None = None
        self._read = 60.0
        self._deadline: float | None = None
        self._inflate: zlib._Decompress | None = None

    def configure(self, read: float, deadline: float | None, encoding: str) -> None:
        self._read, self._deadline = read, deadline
        if encoding in ("gzip", "deflate"):
            self._inflate = zlib.decompressobj(
                16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
            )
        elif encoding not in ("identity", ""):
            raise UpstreamProtocolError(f"unsupported Content-Encoding {encoding!r}")

    @property
    def ended(self) -> bool:
        """Whether the whole body has arrived (not necessarily been read)."""
        return self._ended

    # -- fed by the connection
    def feed(self, data: bytes) -> None:
        self._pieces.append(data)
        self._buffered += len(data)
        if not self._paused and self._buffered > PAUSE_AT_BYTES:
            self._paused = True
            self._connection.pause_reading(self)
        self._wake()

    def end(self) -> None:
        self._ended = True
        self._wake()

    def fail(self, exc: Exception) -> None:
        if not self._ended and self._error is None:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)  # False: woken, not timed out

    # -- read by the caller
    def __aiter__(self) -> BodyReader:
        return self

    async def __anext__(self) -> bytes:
        pieces = self._pieces
        while not pieces:
            if self._error is not None:
                raise self._error
            if self._ended:
                raise StopAsyncIteration
            await self._wait()
        piece = pieces.popleft() if len(pieces) == 1 else _drain(pieces)
        self._buffered -= len(piece)
        if self._paused and self._buffered < RESUME_AT_BYTES:
            self._paused = False
            self._connection.resume_reading(self)
        if self._inflate is not None:
            piece = self._decompress(piece)
        return piece

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        seconds = self._read
        if self._deadline is not None:
            seconds = min(seconds, self._deadline - loop.time())
            if seconds <= 0:
                raise TimeoutError("the upstream stream ran past its total timeout")
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(seconds, _expire, waiter)
        try:
            if await waiter:
                raise TimeoutError(f"no stream data within {seconds:g} s")
        finally:
            timer.cancel()
            self._waiter = None

    def _decompress(self, piece: bytes) -> bytes:
        assert self._inflate is not None
        try:
            return self._inflate.decompress(piece)
        except zlib.error as exc:
            raise UpstreamProtocolError(f"undecodable stream body: {exc}") from None

    def drop(self) -> None:
        """Free what arrived and was not read, once the connection is dropped. Not left to
        the connection's end: it is in a reference cycle with its parser (httptools calls
        back into it), and a stream that stalled has lived into the collector's oldest
        generation, collected rarely: until then its unread body would stay in memory."""
        self._pieces.clear()
        self._buffered = 0

    async def discard(self, seconds: float) -> None:
        """Read and drop what is left of the body, for at most `seconds`."""
        deadline = asyncio.get_running_loop().time() + seconds
        self._read = min(self._read, seconds)
        self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
        with contextlib.suppress(TimeoutError, OSError):
            async for _ in self:
                pass

    async def read(self, limit: int = MAX_BODY_BYTES) -> bytes:
        """The rest of the body, whole (an error answer): at most `limit` bytes are kept."""
        parts: list[bytes] = []
        size = 0
        async for piece in self:
            if size < limit:
                parts.append(piece[: limit - size])
            size += len(piece)
        return b"".join(parts)


def _drain(pieces: deque[bytes]) -> bytes:
    joined = b"".join(pieces)
    pieces.clear()
    return joined


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(True)  # True: timed out


class Streamed:
    """A streamed response, returned at its head. `close()` once done with it: the connection
    goes back to the pool when the body ended and the server keeps it alive, else is dropped
    (which, mid-stream, is how an upstream generation is cancelled)."""

    __slots__ = ("_client", "_connection", "_origin", "body", "headers", "status")

    def __init__(
        self,
        status: int,
        headers: CIMultiDictProxy[str],
        connection: _Connection,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = BodyReader(connection)
        self._connection: _Connection | None = connection
        self._client: Http1Client | None = None
        self._origin: Origin | None = None

    def close(self, linger: float = 0.0) -> None:
        """Once; a later call does nothing (the connection may already carry another request).
        With `linger`, the caller has all it needs but the body's end (a chunked terminator)
        may still be on its way: a task off the caller's path waits up to `linger` seconds
        for it, to keep the connection (the caller's own task may be cancelled any time)."""
        if self._connection is None:
            return
        if linger > 0 and not self.body.ended:
            task = asyncio.get_running_loop().create_task(self._close_after_end(linger))
            _lingering.add(task)
            task.add_done_callback(_lingering.discard)
            return
        connection, client, origin = self._connection, self._client, self._origin
        self._connection = None
        if client is not None and origin is not None and self.body.ended:
            client.put_back(origin, connection)
        else:
            connection._abort()
            self.body.drop()

    async def _close_after_end(self, seconds: float) -> None:
        try:
            await self.body.discard(seconds)
        finally:
            self.close()


_lingering: set[asyncio.Task[None]] = set()  # Streamed._close_after_end tasks, held until done


class _Connection(asyncio.Protocol):
    """One TCP connection, one request at a time; httptools calls back as bytes arrive. The
    waiter is answered with the whole Response, or, for a streamed request, with a Streamed
    at the head whose BodyReader then takes the body."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
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
        self._keep_alive = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes while idle: the connection cannot be trusted
            self._abort()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"unparseable response: {exc}"))
            self._abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
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
        self.transport.write(head + body)
        return waiter

    def reusable(self) -> bool:
        """After a complete response: whether the connection may carry another request."""
        return self._done and not self.closed and self._keep_alive and not self._rcvbuf_bounded

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
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()


def _why(exc: Exception | None) -> str:
    return f": {exc}" if exc else ""


class Http1Client:
    """Pooled connections per origin: `request` returns the whole response, `stream` its head
    with a reader of the body."""

    def __init__(self) -> None:
        self._idle: dict[Origin, list[tuple[_Connection, float]]] = {}  # and when it went idle
        self._tls: ssl.SSLContext | None = None
        self._targets: dict[str, Target] = {}  # URLs come from the config: a bounded set
        self._origins: dict[tuple[str, str, int], Origin] = {}
        self._heads: dict[tuple[str, Target], tuple[Mapping[str, str], bytes]] = {}

    def target(self, url: str) -> Target:
        found = self._targets.get(url)
        if found is None:
            parsed = Target.parse(url)
            origin = parsed.origin
            key = (origin.scheme, origin.host, origin.port)  # one Origin (one pool) per origin
            found = self._targets[url] = Target(self._origins.setdefault(key, origin), parsed.path)
        return found

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    async def _connect(self, origin: Origin, seconds: float) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if origin.scheme == "https" else None
        async with asyncio.timeout(seconds):
            _, connection = await loop.create_connection(
                _Connection, origin.host, origin.port, ssl=tls,
                server_hostname=origin.host if tls else None,
            )  # fmt: skip
        return connection

    def _take(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection, since = idle.pop()
            if not connection.closed and now - since < KEEPALIVE_SECONDS:
                return connection
            connection._abort()
        return None

    async def request(
        self,
        target: Target,
        headers: Mapping[str, str],
        body: bytes,
        connect: float,
        read: float,
        total: float | None = None,
        method: str = "POST",
    ) -> Response:
        """Send a request and read its whole response."""
        connection, response = await self._send(
            method, target, headers, body, connect, read, total, False
        )
        response.body = _decoded(response)
        self.put_back(target.origin, connection)
        return response

    async def stream(
        self,
        target: Target,
        headers: Mapping[str, str],
        body: bytes,
        connect: float,
        read: float,
        total: float | None = None,
        method: str = "POST",
    ) -> Streamed:
        """Send a request and return at the response head; the body follows in
        `Streamed.body`. The caller must `close()` the Streamed."""
        deadline = None if total is None else asyncio.get_running_loop().time() + total
        connection, streamed = await self._send(
            method, target, headers, body, connect, read, total, True
        )
        streamed._client, streamed._origin = self, target.origin
        try:
            encoding = streamed.headers.get("Content-Encoding", "identity").lower()
            streamed.body.configure(read, deadline, encoding)
        except UpstreamProtocolError:
            connection._abort()
            raise
        return streamed

    async def _send(
        self,
        method: str,
        target: Target,
        headers: Mapping[str, str],
        body: bytes,
        connect: float,
        read: float,
        total: float | None,
        streaming: bool,
    ) -> tuple[_Connection, Any]:
        """The exchange up to the whole response (or a stream's head), within `total`."""
        head = self._head(method, target, headers, len(body))
        if total is None:
            return await self._exchange(target, head, body, connect, read, streaming)
        async with asyncio.timeout(total):
            return await self._exchange(target, head, body, connect, read, streaming)

    def put_back(self, origin: Origin, connection: _Connection) -> None:
        """Pool a connection after a complete response, or drop it."""
        if connection.reusable():
            connection.release()
            idle = self._idle.setdefault(origin, [])
            if len(idle) < MAX_IDLE_PER_ORIGIN:
                idle.append((connection, time.monotonic()))
                return
        connection._abort()

    async def _exchange(
        self,
        target: Target,
        head: bytes,
        body: bytes,
        connect: float,
        read: float,
        streaming: bool,
    ) -> tuple[_Connection, Any]:
        """One request on an idle connection or a new one. A failure is not retried here (a
        POST the upstream may have run): the provider's retries and the cascade decide."""
        connection = self._take(target.origin)
        if connection is None:
            connection = await self._connect(target.origin, connect)
        try:
            return connection, await connection.send(head, body, read, streaming)
        except BaseException:
            connection._abort()
            raise

    def _head(self, method: str, target: Target, headers: Mapping[str, str], length: int) -> bytes:
        """The request head. Its fixed part is built once per (target, headers) pair: a
        provider's headers are one dict for the life of its config."""
        cached = self._heads.get((method, target))
        if cached is None or cached[0] is not headers:
            cached = self._heads[(method, target)] = (headers, _fixed_head(method, target, headers))
        return cached[1] % length

    def close(self) -> None:
        for idle in self._idle.values():
            for connection, _ in idle:
                connection._abort()
        self._idle.clear()


def _fixed_head(method: str, target: Target, headers: Mapping[str, str]) -> bytes:
    """The head with `%d` where the Content-Length goes."""
    lines = [
        f"{method} ",
        target.path.decode("ascii"),
        f" HTTP/1.1\r\nHost: {target.origin.host_header}\r\nContent-Length: %d\r\n",
        "Accept-Encoding: identity\r\n",
    ]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).replace("%", "%%").replace("%%d\r\n", "%d\r\n", 1).encode("latin-1")


def _decoded(response: Response) -> bytes:
    """The body without its Content-Encoding (we ask for none; some servers send gzip anyway)."""
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    if encoding in ("identity", ""):
        return response.body
    if encoding not in ("gzip", "deflate"):
        raise UpstreamProtocolError(f"unsupported Content-Encoding {encoding!r}")
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        body = inflate.decompress(response.body, MAX_BODY_BYTES)
    except zlib.error as exc:
        raise UpstreamProtocolError(f"undecodable {encoding} body: {exc}") from None
    if inflate.unconsumed_tail:
        raise UpstreamProtocolError(f"response body over {MAX_BODY_BYTES} bytes")
    return body
