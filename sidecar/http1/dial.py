"""Opening a TCP socket to a host: its addresses from a short DNS cache, then tried as
happy eyeballs do (RFC 8305, simplified): families interleaved, the next address started
CONNECT_STAGGER_SECONDS after the last one unless that failed sooner, the first to connect
wins. An unreachable IPv6 address then costs a quarter of a second, not the connect timeout
(uvloop's create_connection has no happy_eyeballs_delay)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

DNS_TTL_SECONDS = 30.0  # an answer is used this long without asking again
DNS_STALE_SECONDS = 300.0  # past its TTL, an answer is still used this long while renewed
CONNECT_STAGGER_SECONDS = 0.25  # RFC 8305's recommended Connection Attempt Delay

Address = tuple[int, Any]  # (family, sockaddr)


class Dialer:
    """Resolves and connects for one client. A fresh answer is used as is; a stale one (past
    its TTL, within DNS_STALE_SECONDS) is used while a task renews it off the request path; a
    missing or older one is looked up first."""

    def __init__(self, ttl: float = DNS_TTL_SECONDS, stagger: float = CONNECT_STAGGER_SECONDS):
        self.ttl = ttl
        self.stagger = stagger
        self._answers: dict[tuple[str, int], tuple[float, list[Address]]] = {}  # and when
        self._renewing: dict[tuple[str, int], asyncio.Task[list[Address]]] = {}

    async def addresses(self, host: str, port: int) -> list[Address]:
        key = (host, port)
        found = self._answers.get(key)
        if found is not None:
            age = time.monotonic() - found[0]
            if age < self.ttl:
                return found[1]
            if age < self.ttl + DNS_STALE_SECONDS:
                if key not in self._renewing:
                    task = asyncio.get_running_loop().create_task(self._lookup(key))
                    self._renewing[key] = task
                    task.add_done_callback(lambda done: self._renewed(key, done))
                return found[1]
        return await self._lookup(key)

    def _renewed(self, key: tuple[str, int], task: asyncio.Task[list[Address]]) -> None:
        self._renewing.pop(key, None)
        if not task.cancelled():
            task.exception()  # a failed renewal keeps the stale answer until it expires

    async def _lookup(self, key: tuple[str, int]) -> list[Address]:
        infos = await asyncio.get_running_loop().getaddrinfo(
            key[0], key[1], type=socket.SOCK_STREAM
        )
        found = _interleaved([(family, sockaddr) for family, _, _, _, sockaddr in infos])
        if not found:
            raise OSError(f"no address for {key[0]}")
        self._answers[key] = (time.monotonic(), found)
        return found

    async def connect(self, host: str, port: int) -> socket.socket:
        """A connected non-blocking socket to the first address of `host` that answers."""
        return await self.race(await self.addresses(host, port), f"{host}:{port}")

    async def race(self, candidates: list[Address], name: str) -> socket.socket:
        """Connect to the first of `candidates` to answer, each started `stagger` seconds
        after the one before (or as soon as that one failed)."""
        addresses = list(candidates)
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[socket.socket]] = set()
        errors: list[str] = []
        try:
            while addresses or pending:
                if addresses:
                    pending.add(loop.create_task(_attempt(*addresses.pop(0))))
                done, pending = await asyncio.wait(
                    pending,
                    timeout=self.stagger if addresses else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                connected = None
                for task in done:
                    if task.exception() is not None:
                        errors.append(str(task.exception()))
                    elif connected is None:
                        connected = task.result()
                    else:
                        task.result().close()
                if connected is not None:
                    return connected
        finally:
            for task in pending:
                task.cancel()
                task.add_done_callback(_close_result)
        raise OSError(f"cannot connect to {name}: " + "; ".join(errors))

    def close(self) -> None:
        for task in self._renewing.values():
            task.cancel()


async def _attempt(family: int, sockaddr: Any) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.get_running_loop().sock_connect(sock, sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def _close_result(task: asyncio.Task[socket.socket]) -> None:
    """A socket connected by an attempt that lost (or was given up on) is closed."""
    if not task.cancelled() and task.exception() is None:
        task.result().close()


def _interleaved(addresses: list[Address]) -> list[Address]:
    """The families alternated, the resolver's first one first (RFC 8305 section 4)."""
    if not addresses:
        return []
    first = addresses[0][0]
    ours = [a for a in addresses if a[0] == first]
    others = [a for a in addresses if a[0] != first]
    out: list[Address] = []
    for index in range(max(len(ours), len(others))):
        out += ours[index : index + 1] + others[index : index + 1]
    return out
