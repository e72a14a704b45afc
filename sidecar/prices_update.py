"""`prices.auto_update`: fresher price data, fetched off the request path.

At start and then every `prices.update_interval` seconds a background task fetches
genai-prices' data (`prices.url`) in a thread, and on success builds the config again with it
(the same reload a changed file gets: requests in flight keep the prices they started with).
A failed fetch, or data that does not parse, is logged and changes nothing: the data in use
(at first the installed package's snapshot) stays. Off by default: no network unless asked.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Protocol

from sidecar.prices import PriceData
from sidecar.settings.model import PriceSettings

log = logging.getLogger("ringside")

FETCH_TIMEOUT = 30.0  # seconds for the whole download
MAX_DATA_BYTES = 64 * 1024 * 1024  # a price file past this is refused, not read


class Reloads(Protocol):
    """What the task needs of the running gateway (runtime.RuntimeHolder)."""

    price_data: PriceData | None

    def reload(self) -> bool: ...


def fetch_blocking(url: str, timeout: float = FETCH_TIMEOUT) -> PriceData:
    """Download and parse one price file (blocking: run it in a thread). Proxies come from
    the environment (HTTPS_PROXY, NO_PROXY), as for urllib."""
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        body = answer.read(MAX_DATA_BYTES + 1)
    if len(body) > MAX_DATA_BYTES:
        raise ValueError(f"the price data is over {MAX_DATA_BYTES} bytes")
    return PriceData.from_json(json.loads(body), dt.datetime.now(dt.UTC))


async def fetch(url: str) -> PriceData:
    return await asyncio.to_thread(fetch_blocking, url)


async def update_periodically(
    holder: Reloads,
    settings: PriceSettings,
    fetcher: Callable[[str], Awaitable[PriceData]] = fetch,
) -> None:
    """Fetch now and every `update_interval` seconds; swap the data in only when a fetch
    succeeds (and the config builds with it)."""
    while True:
        try:
            data = await fetcher(settings.url)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            in_use = holder.price_data.label if holder.price_data else "the installed snapshot"
            log.warning(
                "prices.auto_update: fetching %s failed (%s: %s); keeping %s, next try in %gs",
                settings.url, type(exc).__name__, exc, in_use, settings.update_interval,
            )  # fmt: skip
        else:
            previous = holder.price_data
            holder.price_data = data
            if holder.reload():
                log.info("prices.auto_update: prices now from %s (%s)", data.label, settings.url)
            else:
                holder.price_data = previous
        await asyncio.sleep(settings.update_interval)
