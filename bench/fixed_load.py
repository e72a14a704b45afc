"""Exactly N requests at a fixed concurrency, each answer read to its end and checked.

wrk runs for a time: the requests it has in flight when it stops are cut, and how many there
were makes an instruction count per request uncertain by about concurrency / requests. Here
every request is sent and answered before `send` returns, so a count taken around it covers
whole requests only, the same number each run.
"""

from __future__ import annotations

import asyncio

import aiohttp


class LoadError(RuntimeError):
    """A request got no answer, or an answer other than 200: its count would be no one's."""


def send(url: str, body: str, headers: dict[str, str], requests: int, concurrency: int) -> int:
    """Send `requests` POSTs of `body` over `concurrency` keep-alive connections; returns the
    number answered 200 (all of them: anything else raises LoadError)."""
    return asyncio.run(_send(url, body.encode(), headers, requests, concurrency))


async def _send(
    url: str, body: bytes, headers: dict[str, str], requests: int, concurrency: int
) -> int:
    sent = 0
    failures: list[str] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    wanted = {**headers, "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one_connection() -> None:
            nonlocal sent
            while sent < requests and not failures:
                sent += 1
                async with session.post(url, data=body, headers=wanted) as response:
                    answer = await response.read()
                    if response.status != 200:
                        failures.append(f"{response.status}: {answer[:300]!r}")

        await asyncio.gather(*(one_connection() for _ in range(concurrency)))
    if failures:
        raise LoadError(f"{url} answered {failures[0]}")
    return sent
