"""The client: an Egress per provider setting (proxy, TLS, caps), the request head built once
per target and headers, the exchange on a pooled connection, whole or streamed."""

from __future__ import annotations

import asyncio
import os
import ssl
import zlib
from collections.abc import Mapping
from typing import Any

from sidecar.http1.body import MAX_BODY_BYTES, Streamed, UpstreamProtocolError
from sidecar.http1.connection import Connection, Response, Upload
from sidecar.http1.dial import Dialer
from sidecar.http1.pool import MAX_CONNECTIONS, Pool, Target
from sidecar.http1.proxy import Proxy, ProxyEnv, ProxyRefused

# Targets and request heads are cached per URL. A URL may hold a client's model id (azure's
# deployment URLs, any kind that puts the model in its path): past this many, start afresh.
MAX_CACHED_URLS = 1024


class Egress:
    """How a provider's connections leave: through which proxy (None: as the environment
    says; "": direct), with which TLS context (None: the default one), how many at most per
    origin, how long a request waits for one. Made by Http1Client.egress once per distinct
    setting, so that a reload that keeps them keeps the pools."""

    __slots__ = ("_client", "_targets", "max_connections", "proxy", "tls", "wait_seconds")

    def __init__(
        self,
        client: Http1Client,
        proxy: str | None,
        tls: ssl.SSLContext | None,
        max_connections: int,
        wait_seconds: float | None,
    ) -> None:
        self._client = client
        self._targets: dict[str, Target] = {}  # bounded by MAX_CACHED_URLS
        self.proxy = proxy
        self.tls = tls
        self.max_connections = max_connections
        self.wait_seconds = wait_seconds

    def target(self, url: str) -> Target:
        found = self._targets.get(url)
        if found is None:
            if len(self._targets) >= MAX_CACHED_URLS:
                self._targets.clear()
            found = self._targets[url] = self._client._target(url, self)
        return found

    def target_once(self, url: str) -> Target:
        """A target for one request, not cached: a pass-through URL holds the client's path."""
        return self._client._target(url, self)


class Http1Client:
    """Pooled connections per origin and egress: `request` returns the whole response,
    `stream` its head with a reader of the body. The proxy variables of `environ` (the
    process's environment by default) are read here, once."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.proxies = ProxyEnv.read(os.environ if environ is None else environ)
        self.dialer = Dialer()
        self._tls: ssl.SSLContext | None = None
        self._egresses: dict[tuple[object, ...], Egress] = {}
        self._pools: dict[tuple[str, str, int, Egress], Pool] = {}
        self._heads: dict[tuple[str, Target], tuple[Mapping[str, str], bytes]] = {}
        self._direct = self.egress()

    def egress(
        self,
        proxy: str | None = None,
        tls: ssl.SSLContext | None = None,
        tls_key: object = None,
        max_connections: int = MAX_CONNECTIONS,
        wait_seconds: float | None = None,
    ) -> Egress:
        """The Egress for these settings; `tls_key` names `tls` (its files), so that a
        reload that builds the same context again keeps the pools."""
        key = (proxy, tls_key if tls is not None else None, max_connections, wait_seconds)
        found = self._egresses.get(key)
        if found is None:
            found = self._egresses[key] = Egress(self, proxy, tls, max_connections, wait_seconds)
        return found

    def target(self, url: str) -> Target:
        """A target on the default egress (the environment's proxies)."""
        return self._direct.target(url)

    def _target(self, url: str, egress: Egress) -> Target:
        origin, path = Target.split(url)
        key = (origin.scheme, origin.host, origin.port, egress)
        pool = self._pools.get(key)
        if pool is None:
            tls = None
            if origin.scheme == "https":
                tls = egress.tls or self._tls_context()
            if egress.proxy is None:
                proxy = self.proxies.for_origin(origin)
            else:
                proxy = Proxy.parse(egress.proxy) if egress.proxy else None
            pool = self._pools[key] = Pool(
                origin, tls, self.dialer, proxy, egress.max_connections, egress.wait_seconds
            )
        return Target(pool.origin, path, pool)

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

    async def forward(
        self,
        target: Target,
        headers: Mapping[str, str],
        body: bytes | Upload,
        connect: float,
        read: float,
        total: float | None = None,
        method: str = "POST",
    ) -> Streamed:
        """`stream` for a pass-through request: the body may arrive in pieces (an Upload),
        and the head is built for this request alone (its headers are the client's, its URL
        the client's path: neither is worth a place in the caches of provider calls)."""
        length = len(body) if isinstance(body, bytes) else body.length
        head = _fixed_head(method, target, headers) % length
        deadline = None if total is None else asyncio.get_running_loop().time() + total
        if total is None:
            connection, streamed = await self._exchange(target, head, body, connect, read, True)
        else:
            async with asyncio.timeout(total):
                connection, streamed = await self._exchange(target, head, body, connect, read, True)
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
        body: bytes | Upload,
        connect: float,
        read: float,
        streaming: bool,
    ) -> tuple[Connection, Any]:
        """One request on an idle connection or a new one. A failure is not retried here (a
        POST the upstream may have run): the provider's retries and the cascade decide."""
        pool = target.pool
        connection = pool.take()
        if connection is None:
            connection = await pool.acquire(connect)
        try:
            if isinstance(body, bytes):
                answer = await connection.send(head, body, read, streaming)
            else:
                answer = await (await connection.upload(head, body, read))
        except BaseException:
            connection._abort()
            raise
        if answer.status == 407 and pool.proxy is not None:  # only a proxy sends 407
            connection._abort()
            refusal = ProxyRefused(
                f"proxy {pool.proxy.shown} refused the request: HTTP 407 (Proxy-Authorization)"
            )
            pool.log_refusal(refusal)
            raise refusal
        return connection, answer

    def _head(self, method: str, target: Target, headers: Mapping[str, str], length: int) -> bytes:
        """The request head. Its fixed part is built once per (target, headers) pair: a
        provider's headers are one dict for the life of its config."""
        cached = self._heads.get((method, target))
        if cached is None or cached[0] is not headers:
            if cached is None and len(self._heads) >= 4 * MAX_CACHED_URLS:
                self._heads.clear()
            cached = self._heads[(method, target)] = (headers, _fixed_head(method, target, headers))
        return cached[1] % length

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self.dialer.close()


def _fixed_head(method: str, target: Target, headers: Mapping[str, str]) -> bytes:
    """The head with `%d` where the Content-Length goes. Through a proxy, an http request
    names its target in absolute form and carries the proxy's credentials."""
    origin, proxy = target.origin, target.pool.proxy
    lines = [f"{method} "]
    if proxy is not None and origin.scheme == "http":
        lines.append(f"http://{origin.host_header}")
    lines += [
        target.path.decode("ascii"),
        f" HTTP/1.1\r\nHost: {origin.host_header}\r\nContent-Length: %d\r\n",
        "Accept-Encoding: identity\r\n",
    ]
    if proxy is not None and origin.scheme == "http" and proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}\r\n")
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
