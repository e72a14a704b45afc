"""What SIGTERM does (SPEC 8): drain the api listener, then exit 0.

1. At once: `/readyz` answers 503 (the kubelet takes the pod out of its Services), and every
   api answer not started yet says `Connection: close`, so that keep-alive clients open their
   next connection elsewhere.
2. For `shutdown.delay_seconds` the api listener goes on accepting and serving new requests
   normally: Endpoints, kube-proxy and load balancers take a few seconds to stop sending here.
   SIGINT (Ctrl-C) skips this delay.
3. Then the listening sockets close (a new connection is refused), an idle keep-alive
   connection is closed, a busy one after its answer; requests and streams in progress get up
   to `shutdown.grace_seconds` to finish.
4. Whatever still runs then is ended (`GatewayState.grace_over`, sidecar/api/request_path.py): a
   stream with an SSE error event `server_shutting_down` and its end, a request whose answer
   has not started with a 503 of that code. Each is settled as a client disconnect is: the
   budget hold is charged what the upstream produced and released, the usage record written.
   A client that reads nothing cannot hold the exit up: its connection is dropped after
   CUT_SECONDS.
5. The caller then stops the apps: the usage writer writes out its queue, the stores close.

Nothing here costs a request anything: the per-connection work happens once, at SIGTERM, and
answering with `Connection: close` is one attribute check per request (sidecar/server_limits.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from typing import cast

from aiohttp import web

from sidecar.appkeys import GatewayState
from sidecar.server_limits import GuardedHandler, GuardedServer

log = logging.getLogger("ringside")

POLL_SECONDS = 0.02  # how often the drain looks whether the api requests have finished
CUT_SECONDS = 1.0  # after the grace: for ended requests to send their last event and settle


class Drain:
    """The shutdown of one process's api listener. `begin` is the signal handler; the serve
    loop awaits `started`, then `run`."""

    def __init__(
        self, state: GatewayState, server: GuardedServer, sites: Sequence[web.BaseSite]
    ) -> None:
        self.state = state
        self.server = server
        self.sites = sites
        self.signal: int | None = None
        self.started = asyncio.Event()

    def begin(self, signum: int) -> None:
        """Fail /readyz and close keep-alive connections after their answers, at once: a
        repeated signal changes nothing (the drain it started is under way)."""
        if self.signal is not None:
            log.info("%s: already shutting down", signal.Signals(signum).name)
            return
        self.signal = signum
        self.state.draining = True
        self.server.guard.draining = True
        for handler in self._handlers():
            handler.answer_with_close()
        self.started.set()

    async def run(self) -> None:
        """Steps 2-4 of the module docstring; returns when the api listener is quiet."""
        shutdown = self.state.settings.shutdown
        grace = shutdown.grace_seconds
        delay = 0.0 if self.signal == signal.SIGINT else shutdown.delay_seconds
        name = signal.Signals(self.signal or signal.SIGTERM).name
        log.info(
            "%s: /readyz fails; the api listener serves %g s more (shutdown.delay_seconds), "
            "then requests in progress get up to %g s (shutdown.grace_seconds)",
            name, delay, grace,
        )  # fmt: skip
        if delay > 0:
            await asyncio.sleep(delay)
        for site in self.sites:
            await site.stop()
        for handler in self._handlers():
            handler.stop_serving()
        busy = self._busy()
        if busy:
            log.info("api listener closed; requests in progress: %d", len(busy))
        if await self._quiet(grace):
            return
        self.state.grace_over = True
        ended = sum(handler.cut() for handler in self._busy())
        log.warning(
            "shutdown.grace_seconds (%g s) ran out; requests ended: %d (a stream with an error "
            "event), each charged what it produced",
            grace, ended,
        )  # fmt: skip
        if await self._quiet(CUT_SECONDS):
            return
        for handler in self._busy():
            handler.abort()  # its client reads nothing: its last event cannot leave
        await self._quiet(CUT_SECONDS)

    def _handlers(self) -> list[GuardedHandler]:
        return cast(list[GuardedHandler], self.server.connections)

    def _busy(self) -> list[GuardedHandler]:
        return [handler for handler in self._handlers() if handler.busy]

    async def _quiet(self, seconds: float) -> bool:
        """Whether no api request is in progress, waiting up to `seconds` for it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self._busy():
            left = deadline - loop.time()
            if left <= 0:
                return False
            await asyncio.sleep(min(POLL_SECONDS, left))
        return True
