"""The client: targets parsed once, a pool of keep-alive connections per origin.

A connection is reused only after a complete response that allows keep-alive (and never after
a pause); one the server closed while idle is dropped when the close arrives, and one idle for
KEEPALIVE_SECONDS is closed. A failed request is never sent again here. Upstream URLs come
from the config only.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sidecar.http1.body import MAX_BODY_BYTES, Streamed, UpstreamProtocolError
from sidecar.http1.connection import Connection, Response

MAX_IDLE_PER_ORIGIN = 256
KEEPALIVE_SECONDS = 15.0  # an idle connection older than this is closed, not reused (as aiohttp)


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
    """A URL split once (at config load), with the pool of its origin. Equal by identity:
    Http1Client.target makes one per URL."""

    origin: Origin
    path: bytes
    pool: Pool

    @staticmethod
    def split(url: str) -> tuple[Origin, bytes]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return Origin(parts.scheme, parts.hostname, port), path.encode("ascii")


class Pool:
    """The connections to one origin, and the tasks that wait for a stream's end to keep one
    (Streamed.close with a linger: held here until done, so that none is collected early)."""

    __slots__ = ("idle", "lingering", "origin", "tls")

    def __init__(self, origin: Origin, tls: ssl.SSLContext | None) -> None:
        self.origin = origin
        self.tls = tls
        self.idle: list[tuple[Connection, float]] = []  # and when it went idle
        self.lingering: set[asyncio.Task[None]] = set()

    def take(self) -> Connection | None:
        idle = self.idle
        now = time.monotonic()
        while idle:
            connection, since = idle.pop()
            if not connection.closed and now - since < KEEPALIVE_SECONDS:
                return connection
            connection._abort()
        return None

    async def connect(self, seconds: float) -> Connection:
        loop = asyncio.get_running_loop()
        origin, tls = self.origin, self.tls
        async with asyncio.timeout(seconds):
            _, connection = await loop.create_connection(
                Connection, origin.host, origin.port, ssl=tls,
                server_hostname=origin.host if tls else None,
            )  # fmt: skip
        return connection

    def put_back(self, connection: Connection) -> None:
        """Pool a connection after a complete response, or drop it."""
        if connection.reusable():
            connection.release()
            idle = self.idle
            if len(idle) < MAX_IDLE_PER_ORIGIN:
                idle.append((connection, time.monotonic()))
                return
        connection._abort()

    def close(self) -> None:
        for connection, _ in self.idle:
            connection._abort()
        self.idle.clear()
        for task in self.lingering:
            task.cancel()


class Http1Client:
    """Pooled connections per origin: `request` returns the whole response, `stream` its head
    with a reader of the body."""

    def __init__(self) -> None:
        self._tls: ssl.SSLContext | None = None
        self._targets: dict[str, Target] = {}  # URLs come from the config: a bounded set
        self._pools: dict[tuple[str, str, int], Pool] = {}
        self._heads: dict[tuple[str, Target], tuple[Mapping[str, str], bytes]] = {}

    def target(self, url: str) -> Target:
        found = self._targets.get(url)
        if found is None:
            origin, path = Target.split(url)
            key = (origin.scheme, origin.host, origin.port)  # one Origin (one pool) per origin
            pool = self._pools.get(key)
            if pool is None:
                tls = self._tls_context() if origin.scheme == "https" else None
                pool = self._pools[key] = Pool(origin, tls)
            found = self._targets[url] = Target(pool.origin, path, pool)
        return found

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

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
        target.pool.put_back(connection)
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
        streamed._pool = target.pool
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
    ) -> tuple[Connection, Any]:
        """The exchange up to the whole response (or a stream's head), within `total`."""
        head = self._head(method, target, headers, len(body))
        if total is None:
            return await self._exchange(target, head, body, connect, read, streaming)
        async with asyncio.timeout(total):
            return await self._exchange(target, head, body, connect, read, streaming)

    async def _exchange(
        self,
        target: Target,
        head: bytes,
        body: bytes,
        connect: float,
        read: float,
        streaming: bool,
    ) -> tuple[Connection, Any]:
        """One request on an idle connection or a new one. A failure is not retried here (a
        POST the upstream may have run): the provider's retries and the cascade decide."""
        pool = target.pool
        connection = pool.take()
        if connection is None:
            connection = await pool.connect(connect)
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
        for pool in self._pools.values():
            pool.close()


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
