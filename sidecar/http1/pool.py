"""Targets parsed once, and a pool of keep-alive connections per origin and egress.

A pool holds at most `max_connections` connections (idle or busy, opening included); a request
that finds none free waits its turn (first come, first served) for up to the pool timeout, then
fails as an upstream timeout.

A connection is reused only after a complete response that allows keep-alive (and never after
a pause); one the server closed while idle is dropped when the close arrives, and one idle for
KEEPALIVE_SECONDS is closed. A failed request is never sent again here. Upstream URLs come
from the config only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from sidecar.http1.body import UpstreamProtocolError
from sidecar.http1.connection import Connection
from sidecar.http1.dial import Dialer
from sidecar.http1.proxy import Proxy, ProxyRefused, open_tunnel

MAX_IDLE_PER_ORIGIN = 256
KEEPALIVE_SECONDS = 15.0  # an idle connection older than this is closed, not reused (as aiohttp)
MAX_CONNECTIONS = 100  # per origin and egress, unless the provider says otherwise
REFUSAL_LOG_SECONDS = 10.0  # one log line per pool per this long for a proxy's refusals

log = logging.getLogger("ringside")


@dataclass(frozen=True, slots=True, eq=False)
class Origin:
    """Equal by identity, so cheap as a dict key: Http1Client.target makes one per origin."""

    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def authority(self) -> str:
        """host:port, as CONNECT names it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True, eq=False)
class Target:
    """A URL split once (at config load), with the pool of its origin. Equal by identity:
    an Egress makes one per URL."""

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
    """The connections to one origin through one egress: idle ones, how many are open, the
    requests waiting for one; and the tasks that wait for a stream's end to keep one
    (Streamed.close with a linger: held here until done, so that none is collected early)."""

    __slots__ = (
        "dialer", "idle", "lingering", "max_connections", "open", "origin", "proxy",
        "refused_logged_at", "tls", "wait_seconds", "waiters",
    )  # fmt: skip

    def __init__(
        self,
        origin: Origin,
        tls: ssl.SSLContext | None,
        dialer: Dialer,
        proxy: Proxy | None = None,
        max_connections: int = MAX_CONNECTIONS,
        wait_seconds: float | None = None,
    ) -> None:
        self.origin = origin
        self.dialer = dialer
        self.tls = tls
        self.proxy = proxy
        self.max_connections = max_connections
        self.wait_seconds = wait_seconds  # None: the request's connect timeout
        self.idle: list[tuple[Connection, float]] = []  # and when it went idle
        self.open = 0  # connections open or opening, idle ones included
        self.waiters: deque[asyncio.Future[Connection | None]] = deque()
        self.lingering: set[asyncio.Task[None]] = set()
        self.refused_logged_at = -REFUSAL_LOG_SECONDS

    def take(self) -> Connection | None:
        """An idle connection (a plain call: the path of almost every request)."""
        idle = self.idle
        if idle:
            now = time.monotonic()
            while idle:
                connection, since = idle.pop()
                if not connection.closed and now - since < KEEPALIVE_SECONDS:
                    return connection
                connection._abort()
        return None

    async def acquire(self, connect: float) -> Connection:
        """When none is idle: a new connection if under the cap, else the first one freed."""
        if self.open < self.max_connections:
            self.open += 1
        else:  # the cap: wait for a connection put back, or for the slot of one closed
            handed = await self._wait(connect if self.wait_seconds is None else self.wait_seconds)
            if handed is not None:
                return handed
        try:
            connection = await self._connect(connect)
        except BaseException:
            self.lost()
            raise
        connection.pool = self
        if connection.closed:  # closed before it was counted
            self.lost()
            raise UpstreamProtocolError("the upstream closed the connection at once")
        return connection

    async def _wait(self, seconds: float) -> Connection | None:
        """A connection handed over by `put_back`, or None when one closed (a slot freed)."""
        waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(seconds):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():  # handed over as this gave up
                handed = waiter.result()
                if handed is None:
                    self.lost()  # the slot goes on
                else:
                    self.put_back(handed)
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise TimeoutError(
                    f"no connection to {self.origin.authority} free within {seconds:g} s "
                    f"({self.max_connections} open: max_connections)"
                ) from None
            raise

    async def _connect(self, seconds: float) -> Connection:
        loop = asyncio.get_running_loop()
        origin, tls, proxy = self.origin, self.tls, self.proxy
        try:
            async with asyncio.timeout(seconds):
                if proxy is None:
                    sock = await self.dialer.connect(origin.host, origin.port)
                    _, connection = await loop.create_connection(
                        Connection, sock=sock, ssl=tls,
                        server_hostname=origin.host if tls else None,
                    )  # fmt: skip
                else:
                    if proxy.unusable:
                        raise ProxyRefused(proxy.unusable)
                    sock = await self.dialer.connect(proxy.host, proxy.port)
                    if tls is None:  # http through the proxy: absolute-form requests
                        _, connection = await loop.create_connection(Connection, sock=sock)
                    else:
                        connection = Connection()
                        await open_tunnel(proxy, origin, connection, tls, sock)
        except ProxyRefused as exc:
            self.log_refusal(exc)
            raise
        return connection

    def log_refusal(self, exc: ProxyRefused) -> None:
        now = time.monotonic()
        if now - self.refused_logged_at >= REFUSAL_LOG_SECONDS:
            self.refused_logged_at = now
            log.warning("upstream %s unreachable: %s", self.origin.authority, exc)

    def put_back(self, connection: Connection) -> None:
        """Pool a connection after a complete response (or hand it to the first waiter), or
        drop it."""
        if connection.reusable():
            connection.release()
            waiters = self.waiters
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(connection)
                    return
            idle = self.idle
            if len(idle) < MAX_IDLE_PER_ORIGIN:
                idle.append((connection, time.monotonic()))
                return
        connection._abort()

    def lost(self) -> None:
        """A connection closed (or was never opened): its slot goes to the first waiter, which
        opens one, else is freed."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.open -= 1

    def close(self) -> None:
        for connection, _ in self.idle:
            connection._abort()
        self.idle.clear()
        for task in self.lingering:
            task.cancel()
