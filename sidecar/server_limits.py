"""Bounds on the connections of the two listeners: header, body and idle deadlines, a cap on
open connections, and aiohttp's own parser rejections answered in the OpenAI envelope.

aiohttp's server reads headers and bodies without a deadline and accepts connections until the
process runs out of file descriptors: silent or byte-by-byte (slowloris) connections then starve
every other caller, the admin probes included. Here each listener's connections are made by a
`GuardedHandler` that counts itself against its `ListenerGuard`:

- a new connection must deliver its first request's headers within `limits.header_timeout` of
  being accepted, and a keep-alive connection the headers of its next request within
  `header_timeout` of their first byte; otherwise it is closed;
- a request body must arrive within `limits.body_timeout` of its headers; otherwise the handler
  reading it gets `408 request_timeout` and the connection is closed after that answer;
- a keep-alive connection idle for `limits.idle_timeout` is closed (aiohttp's own keep-alive);
- beyond `limits.max_connections` (api) or `limits.admin_max_connections` (admin) open
  connections, a new one is answered `503 server_busy` at once and closed. One log line when a
  listener reaches its cap and one when it is below again, never one per connection.

The costs are per connection, not per request: one timer armed at accept and re-armed only when
headers or a body straddle reads; a request whose headers and body arrive together adds two
comparisons to aiohttp's own work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import resource
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from sidecar.addons.metrics import Metrics
from sidecar.errors import GatewayError
from sidecar.settings.model import Limits

log = logging.getLogger("ringside")

FD_RESERVE = 128  # descriptors kept for stores, logs, config reloads and the listening sockets
RESUME_FRACTION = 0.9  # a saturated listener is "below its cap again" at this share of it
# a connection's kernel send buffer (the kernel doubles it: 256 KiB). Left to autotuning it grows
# to tcp_wmem's maximum (4 MiB), and a client that does not read its stream would park that much
# of its answer in kernel memory, charged to the pod's cgroup, before the write side pauses and,
# through it, the upstream read
SEND_BUFFER_BYTES = 128 * 1024
_SAFE_REASON = re.compile(r"[A-Za-z][A-Za-z0-9 ,.'()_-]{0,120}")


class ListenerGuard:
    """The open connections of one listener (`api` or `admin`) against its cap.

    `limits` is read at each new connection, so a reload changes the deadlines and the cap of
    the connections that come after it. `ceiling` caps the cap: what the process's file
    descriptors can hold (see `api_connection_ceiling`)."""

    def __init__(self, name: str, limits: Callable[[], Limits], ceiling: int | None = None) -> None:
        self.name = name
        self.limits = limits
        self.ceiling = ceiling
        self.open = 0
        self.refused = 0
        self.saturated = False
        self._refused_while_saturated = 0
        self._tally: Any = None
        self._open_gauge: Any = None
        self._refused_counter: Any = None
        self._timeouts: dict[str, Any] = {}
        self._busy: tuple[int, bytes] = (0, b"")
        # SIGTERM (sidecar/shutdown.py): every answer from then on says `Connection: close`
        self.draining = False

    def attach(self, metrics: Metrics) -> None:
        """Count into `metrics` (made by the api app's start, after the runners are built)."""
        self._tally = metrics.tally
        self._open_gauge = metrics.open_connections.labels(self.name)
        self._refused_counter = metrics.connections_refused.labels(self.name)
        self._timeouts = {
            phase: metrics.connection_timeouts.labels(self.name, phase)
            for phase in ("header", "body")
        }
        if self.open:
            self._tally.inc(self._open_gauge, self.open)

    @property
    def cap_field(self) -> str:
        return "max_connections" if self.name == "api" else "admin_max_connections"

    def cap(self, limits: Limits) -> int:
        cap: int = getattr(limits, self.cap_field)
        return cap if self.ceiling is None else min(cap, self.ceiling)

    def admit(self, transport: asyncio.BaseTransport, limits: Limits) -> bool:
        """Whether a new connection may stay; if not, it is answered 503 and closed."""
        cap = self.cap(limits)
        if self.open < cap:
            self.open += 1
            if self._tally is not None:
                self._tally.inc(self._open_gauge)
            return True
        self.refused += 1
        if self._tally is not None:
            self._tally.inc(self._refused_counter)
        self._refused_while_saturated += 1
        if not self.saturated:
            self.saturated = True
            log.warning(
                "%s listener: %d connections open, its cap (limits.%s): new connections are "
                "answered 503 and closed until fewer than %d are open",
                self.name, self.open, self.cap_field, self._resume_at(cap) + 1,
            )  # fmt: skip
        writer = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio subclass
        writer.write(self._busy_response(cap))
        writer.close()
        return False

    def closed(self) -> None:
        self.open -= 1
        if self._tally is not None:
            self._tally.inc(self._open_gauge, -1.0)
        if self.saturated and self.open <= self._resume_at(self.cap(self.limits())):
            self.saturated = False
            log.info(
                "%s listener: %d connections open, below its cap again: accepting; "
                "%d refused meanwhile",
                self.name, self.open, self._refused_while_saturated,
            )  # fmt: skip
            self._refused_while_saturated = 0

    def timed_out(self, phase: str) -> None:
        if self._tally is not None:
            self._tally.inc(self._timeouts[phase])

    @staticmethod
    def _resume_at(cap: int) -> int:
        return min(cap - 1, int(cap * RESUME_FRACTION))

    def _busy_response(self, cap: int) -> bytes:
        if self._busy[0] != cap:
            body = GatewayError(
                503,
                "server_busy",
                f"the sidecar's {self.name} listener has {cap} connections open, its limit "
                f"(limits.{self.cap_field}); retry shortly",
            ).body()
            head = (
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
            )
            self._busy = (cap, head.encode() + body)
        return self._busy[1]


def body_timeout_error(seconds: float) -> GatewayError:
    return GatewayError(
        408,
        "request_timeout",
        f"the request body did not arrive within {seconds:g} s of its headers "
        "(limits.body_timeout); send it faster or in a smaller request",
        error_type="invalid_request_error",
        headers={"Connection": "close"},
    )


def parser_rejection(exc: BaseException | None) -> str:
    """Why aiohttp's parser refused a request, in words that never quote the request's bytes
    (aiohttp's own messages carry an excerpt of the offending line)."""
    if isinstance(exc, LineTooLong):
        return f"a header line or the request line is over the {exc.args[1]}-byte limit"
    if isinstance(exc, InvalidHeader):
        return "a header value holds a character that is not allowed (NUL or another control)"
    if isinstance(exc, BadHttpMethod):
        if str(exc.message).startswith("Received HTTPS"):
            return "HTTPS was sent to a plain-HTTP listener"
        return "the request method is not valid"
    if isinstance(exc, BadStatusLine):
        return "the request line is not valid HTTP/1.1"
    if isinstance(exc, InvalidURLError):
        return "the request target is not a valid path"
    if isinstance(exc, HttpProcessingError):
        # llhttp's reason is a fixed text; the bytes it quotes follow the first ":\n"
        reason = str(exc.message).split(":\n", 1)[0]
        if _SAFE_REASON.fullmatch(reason):
            return reason
    return "the request is not valid HTTP/1.1"


class GuardedHandler(RequestHandler):
    """aiohttp's connection handler with the deadlines and the cap of its `ListenerGuard`.

    One timer per connection serves both deadlines: `_header_due` and `_body_due` are loop
    times (0.0: none pending), and the timer, when it fires early for a deadline that moved
    later, re-arms itself for the next one instead of being cancelled on every change."""

    __slots__ = (
        "_admitted",
        "_body",
        "_body_due",
        "_body_timeout",
        "_deadline",
        "_guard",
        "_header_due",
        "_header_timeout",
        "_limits",
    )

    def __init__(
        self, manager: web.Server, guard: ListenerGuard, limits: Limits, **kwargs: Any
    ) -> None:
        kwargs["keepalive_timeout"] = limits.idle_timeout
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._limits = limits
        self._admitted = False
        self._header_timeout = limits.header_timeout
        self._body_timeout = limits.body_timeout
        self._header_due = 0.0
        self._body_due = 0.0
        self._body: Any = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._guard.admit(transport, self._limits):
            self._force_close = True  # aiohttp ignores whatever still arrives
            return
        self._admitted = True
        sock = transport.get_extra_info("socket")
        if sock is not None:  # once per connection, not per streamed answer (~10k instructions)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self._header_due = self._loop.time() + self._header_timeout
        self._arm(self._header_due)
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._guard.closed()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._body = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        count = self._request_count
        RequestHandler.data_received(self, data)
        if self._request_count != count:  # a request's headers are complete
            self._header_due = 0.0
            messages = self._messages
            if messages:
                if self._guard.draining:
                    self._close_after(messages)
                payload = messages[-1][1]
                if not payload.is_eof():  # its body straddles reads: it gets a deadline
                    self._body = payload
                    self._body_due = self._loop.time() + self._body_timeout
                    self._arm(self._body_due)
        elif not self._header_due and self._waiter is not None and data:
            # the first bytes of a keep-alive connection's next request: its headers' deadline
            self._header_due = self._loop.time() + self._header_timeout
            self._arm(self._header_due)

    # -- shutdown (sidecar/shutdown.py): these run once per connection at SIGTERM, never per request
    @property
    def busy(self) -> bool:
        """A request is being answered, or waits in this connection's queue."""
        return self._request_in_progress or bool(self._messages)

    def answer_with_close(self) -> None:
        """The answers not started yet say `Connection: close`, and the connection closes
        after them: a keep-alive client opens its next connection elsewhere (through its
        Service or load balancer, to a replica that is ready)."""
        request = self._current_request
        if request is not None:
            request._message = _closing(request._message)
        self._close_after(self._messages)

    @staticmethod
    def _close_after(messages: deque[Any]) -> None:
        for index, (message, payload) in enumerate(messages):
            messages[index] = (_closing(message), payload)

    def stop_serving(self) -> None:
        """Take no further request: an idle connection is closed now, a busy one after the
        answer in progress."""
        if self.busy:
            self.close()
        else:
            self.force_close()

    def cut(self) -> bool:
        """Cancel the request in progress, if any (its handler ends its answer as it can:
        sidecar/api/request_path.py); the connection closes after it. Whether one was cancelled."""
        self.close()
        task = self._task_handler
        if not self._request_in_progress or task is None or task.done():
            return False
        task.cancel()
        return True

    def abort(self) -> None:
        """Drop the connection without flushing: a client that reads nothing cannot hold
        the exit up (a write waiting on it then fails, and its handler finishes)."""
        if self.transport is not None:
            self.transport.abort()

    def _arm(self, due: float) -> None:
        deadline = self._deadline
        if deadline is not None:
            if deadline.when() <= due:
                return  # it fires first and re-arms for `due`
            deadline.cancel()
        self._deadline = self._loop.call_at(due, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline = None
        if self.transport is None:
            return
        now = self._loop.time()
        if self._header_due and now >= self._header_due:
            self._guard.timed_out("header")
            self.force_close()
            return
        if self._body_due and now >= self._body_due:
            self._body_due = 0.0
            body, self._body = self._body, None
            if body is not None and not body.is_eof():
                self._guard.timed_out("body")
                self._end_body(body)
        pending = [due for due in (self._header_due, self._body_due) if due]
        if pending and self.transport is not None:
            self._deadline = self._loop.call_at(min(pending), self._on_deadline)

    def _end_body(self, body: Any) -> None:
        """A body past its deadline: the handler reading it gets 408, and the connection
        closes after that answer (with nothing more read from it)."""
        self._lingering_time = 0.0
        self.close()
        body.set_exception(body_timeout_error(self._body_timeout))
        if not self._request_in_progress:  # nothing is reading it: no answer to wait for
            self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's own errors (a request its parser refused, a handler that raised) in the
        OpenAI envelope. A parser rejection is the client's doing and is not logged: hostile
        input must not be able to fill the log."""
        if status == 400 and isinstance(exc, HttpProcessingError):
            error = GatewayError(
                400,
                "invalid_request",
                f"the request is not valid HTTP/1.1: {parser_rejection(exc)}; nothing was "
                "processed",
            )
        else:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            error = GatewayError(status, "internal_error", "internal error")
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started: no error response can follow")
        response = web.Response(status=status, body=error.body(), content_type="application/json")
        response.force_close()
        return response


def _closing(message: Any) -> Any:
    """A parsed request that asks for its connection to be closed after its answer (aiohttp
    then answers it with `Connection: close`); a parser error is left as it is."""
    if getattr(message, "should_close", True):
        return message
    return message._replace(should_close=True)


class GuardedServer(web.Server):
    """aiohttp's low-level server, making `GuardedHandler`s of one `ListenerGuard`."""

    def __init__(self, made: web.Server, guard: ListenerGuard) -> None:
        super().__init__(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
        self.guard = guard

    def __call__(self) -> RequestHandler:
        return GuardedHandler(
            self, self.guard, self.guard.limits(), loop=self._loop, **self._kwargs
        )


class GuardedRunner(web.AppRunner):
    """An AppRunner whose connections are bounded by `guard`."""

    __slots__ = ("guard",)

    def __init__(self, app: web.Application, guard: ListenerGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self.guard)


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (children inherit it);
    return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    if soft != infinite and soft != hard:
        target = hard if hard != infinite else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft if soft != infinite else 1 << 30


def api_connection_ceiling(limits: Limits, fd_limit: int | None = None) -> int:
    """The most api connections the file-descriptor limit can hold: each may hold an upstream
    connection too, and the admin listener's cap and FD_RESERVE stay free, so that /healthz
    and /readyz answer while the api listener is full."""
    if fd_limit is None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        fd_limit = soft if soft != resource.RLIM_INFINITY else 1 << 30
    return max(1, (fd_limit - limits.admin_max_connections - FD_RESERVE) // 2)


def fd_limit_warning(limits: Limits, fd_limit: int) -> str | None:
    """A line for the operator when `limits.max_connections` is more than `fd_limit` allows."""
    ceiling = api_connection_ceiling(limits, fd_limit)
    if limits.max_connections <= ceiling:
        return None
    return (
        f"limits.max_connections is {limits.max_connections}, but the open-file limit "
        f"(RLIMIT_NOFILE {fd_limit}) holds {ceiling} api connections (each may need an upstream "
        f"connection too, and limits.admin_max_connections stay free): the api listener takes "
        f"at most {ceiling}; raise the limit (ulimit -n) for more"
    )
