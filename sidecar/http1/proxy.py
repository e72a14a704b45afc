"""Egress proxies, as curl reads them: `http_proxy` / `HTTP_PROXY`, `https_proxy` /
`HTTPS_PROXY`, `all_proxy` / `ALL_PROXY` (lowercase first) and `no_proxy` / `NO_PROXY`, read
once when the client is made; a provider's `proxy:` overrides them for its calls.

An https origin is reached through `CONNECT host:port` and TLS inside the tunnel; an http
origin through the proxy with the request target in absolute form (as curl does). Only
http:// proxies are supported (no TLS to the proxy, no SOCKS): a variable holding another URL
fails closed (logged at start; the calls it covers fail, none goes direct). NO_PROXY holds
host names (a name matches itself and its subdomains, with or without a leading dot), IP
addresses, CIDR ranges and `*`; ports in its entries are not supported. Loopback is not
exempt unless listed.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from sidecar.http1.pool import Origin

MAX_CONNECT_REPLY_BYTES = 16 * 1024
DEFAULT_PROXY_PORT = 1080  # curl's, for a proxy URL without a port

log = logging.getLogger("ringside")


class ProxyRefused(ConnectionError):
    """The proxy answered CONNECT (or a proxied request) with a refusal: an upstream outage."""


@dataclass(frozen=True, slots=True)
class Proxy:
    host: str
    port: int
    authorization: str | None  # the Proxy-Authorization value, from the URL's user:password
    shown: str  # the URL without credentials: what a log line may say
    unusable: str | None = None  # why an environment variable's URL cannot be used

    @classmethod
    def parse(cls, url: str) -> Proxy:
        """A proxy URL; ValueError (naming no credential) for one this client cannot use."""
        if "://" not in url:
            url = "http://" + url  # as curl
        parts = urlsplit(url)
        if parts.scheme.lower() != "http":
            raise ValueError(f"unsupported proxy scheme {parts.scheme!r} (only http://)")
        try:
            host, port = parts.hostname, parts.port or DEFAULT_PROXY_PORT
        except ValueError:
            raise ValueError("the proxy URL has an invalid port") from None
        if not host:
            raise ValueError("the proxy URL has no host")
        authorization = None
        if parts.username is not None:
            user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(user_pass.encode()).decode("ascii")
        shown_host = f"[{host}]" if ":" in host else host
        return cls(host, port, authorization, f"http://{shown_host}:{port}")


@dataclass(frozen=True, slots=True)
class ProxyEnv:
    """The proxy variables of the environment, parsed once."""

    http: Proxy | None = None
    https: Proxy | None = None
    bypass_all: bool = False
    bypass_names: tuple[str, ...] = ()
    bypass_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def read(cls, environ: Mapping[str, str]) -> ProxyEnv:
        def variable(name: str) -> str:
            return environ.get(name.lower()) or environ.get(name.upper()) or ""

        every = variable("all_proxy")
        proxies: dict[str, Proxy | None] = {}
        for scheme in ("http", "https"):
            name = f"{scheme}_proxy"
            url = variable(name) or every
            try:
                proxies[scheme] = Proxy.parse(url) if url else None
            except ValueError as exc:  # fail closed: no call goes direct instead
                why = f"{name.upper()} is unusable: {exc}; {scheme} upstreams are unreachable"
                log.error("%s", why)
                proxies[scheme] = Proxy("", 0, None, name.upper(), why)
        names: list[str] = []
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        bypass_all = False
        for entry in variable("no_proxy").split(","):
            entry = entry.strip().lower()
            if entry == "*":
                bypass_all = True
            elif entry:
                try:
                    networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                except ValueError:
                    names.append(entry.strip("."))
        return cls(proxies["http"], proxies["https"], bypass_all, tuple(names), tuple(networks))

    def for_origin(self, origin: Origin) -> Proxy | None:
        proxy = self.https if origin.scheme == "https" else self.http
        if proxy is None or self.bypassed(origin.host):
            return None
        return proxy

    def bypassed(self, host: str) -> bool:
        """Whether NO_PROXY sends `host` direct."""
        if self.bypass_all:
            return True
        host = host.lower().rstrip(".")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return any(host == name or host.endswith("." + name) for name in self.bypass_names)
        return any(address in network for network in self.bypass_networks)


class _ConnectReply(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT, up to its blank line."""

    def __init__(self) -> None:
        self.head = b""
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.head += data
        if b"\r\n\r\n" in self.head:
            self._answer(self.head)
        elif len(self.head) > MAX_CONNECT_REPLY_BYTES:
            self._answer(ProxyRefused("the proxy's answer to CONNECT is too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._answer(ProxyRefused("the proxy closed the connection during CONNECT"))

    def _answer(self, result: bytes | Exception) -> None:
        if not self.done.done():
            if isinstance(result, Exception):
                self.done.set_exception(result)
            else:
                self.done.set_result(result)


async def open_tunnel(
    proxy: Proxy, origin: Origin, protocol: asyncio.Protocol, tls: object, sock: socket.socket
) -> asyncio.BaseTransport:
    """A TLS transport to `origin` through a CONNECT tunnel on `sock` (connected to the
    proxy), `protocol` its protocol (TLS is started with it: its connection_made is called
    here)."""
    loop = asyncio.get_running_loop()
    transport, reply = await loop.create_connection(_ConnectReply, sock=sock)
    try:
        authority = origin.authority
        request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
        if proxy.authorization:
            request += f"Proxy-Authorization: {proxy.authorization}\r\n"
        transport.write((request + "\r\n").encode("latin-1"))
        head = await reply.done
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProxyRefused(f"proxy {proxy.shown} answered CONNECT with {status_line[:80]!r}")
        if not 200 <= int(parts[1]) < 300:
            raise ProxyRefused(
                f"proxy {proxy.shown} refused CONNECT {authority}: {status_line[:120]}"
            )
        tunnelled = await loop.start_tls(
            transport,
            protocol,
            tls,  # type: ignore[arg-type]
            server_hostname=origin.host,
        )
    except BaseException:
        transport.abort()
        raise
    assert tunnelled is not None
    protocol.connection_made(tunnelled)
    return tunnelled
