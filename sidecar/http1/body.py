"""A response body as it arrives: the reader a stream's caller iterates, and the Streamed
response that hands its connection back to the pool (or drops it) once done."""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections import deque
from typing import TYPE_CHECKING

from multidict import CIMultiDictProxy

if TYPE_CHECKING:
    from sidecar.http1.connection import Connection
    from sidecar.http1.pool import Pool

MAX_BODY_BYTES = 64 * 1024 * 1024
PAUSE_AT_BYTES = 256 * 1024  # a stream's unread body above this pauses the socket
RESUME_AT_BYTES = 64 * 1024


class UpstreamProtocolError(ConnectionError):
    """The upstream broke HTTP/1.1 or closed the connection before the response ended."""


class BodyReader:
    """A streamed response's body: `async for piece in reader` yields the bytes that arrived
    since the last piece (decoded when the server compressed anyway), then ends with the body.
    A wait longer than `read`, or past the `total` deadline, raises TimeoutError."""

    def __init__(self, connection: Connection) -> None:
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

    __slots__ = ("_connection", "_pool", "body", "headers", "status")

    def __init__(
        self,
        status: int,
        headers: CIMultiDictProxy[str],
        connection: Connection,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = BodyReader(connection)
        self._connection: Connection | None = connection
        self._pool: Pool | None = None  # set by the client: where the connection goes back

    def close(self, linger: float = 0.0) -> None:
        """Once; a later call does nothing (the connection may already carry another request).
        With `linger`, the caller has all it needs but the body's end (a chunked terminator)
        may still be on its way: a task off the caller's path waits up to `linger` seconds
        for it, to keep the connection (the caller's own task may be cancelled any time)."""
        if self._connection is None:
            return
        pool = self._pool
        if linger > 0 and not self.body.ended and pool is not None:
            task = asyncio.get_running_loop().create_task(self._close_after_end(linger))
            pool.lingering.add(task)
            task.add_done_callback(pool.lingering.discard)
            return
        connection = self._connection
        self._connection = None
        if pool is not None and self.body.ended:
            pool.put_back(connection)
        else:
            connection._abort()
            self.body.drop()

    async def _close_after_end(self, seconds: float) -> None:
        try:
            await self.body.discard(seconds)
        finally:
            self.close()
