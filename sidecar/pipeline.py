"""The ordered addon chain, in the style of mitmproxy: an addon is a class whose methods are hooks.

Hooks, each taking the Flow (and `attempt` hooks the Attempt too):
  headers(flow)                 before the body is read: who is calling (auth); may set
                                flow.response or raise GatewayError
  request(flow)                 body parsed, before routing; may set flow.response or raise
  routed(flow)                  after the model ref resolved to a Route
  attempt(flow, attempt)        before each upstream call (budget reservation lives here)
  attempt_done(flow, attempt)   after each upstream call, success or failure
  response(flow)                a final response is ready (not for errors)
  error(flow)                   the request ends in a GatewayError
  done(flow)                    always last, exactly once per request (usage, metrics, logs)
Dispatch lists are computed once per Pipeline, so a hook nobody implements costs nothing.

A hook is `async def`, or a plain `def` that returns None when it is done and an awaitable when
it has I/O to wait for (the idempotency addon for a request with an Idempotency-Key, the
budget addon on a shared store; any other return value is ignored): the chain runs
synchronously until a hook hands back an awaitable, so a request whose hooks have nothing to
wait for creates no coroutine and takes no trip through the event loop.

An addon's exception (SPEC 6.1), in the style of mitmproxy's safecall: in an observing hook
(attempt_done, response, error, done) it is logged with the addon's name, counted in
`ringside_addon_errors_total{addon,hook}`, and the chain goes on: it never changes what the client
receives. In a deciding hook (headers, request, routed, attempt) it ends the request with a
`500 internal_error` GatewayError carrying the request id; a GatewayError raised there on
purpose (CandidateRefused included) is the addon's answer and goes on unchanged. The try around
each call costs nothing until something raises (CPython 3.11+), so the loop keeps its shape.
A user addon's method whose name is close to a hook's but is not one is refused at load.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

from sidecar.errors import GatewayError, internal_error
from sidecar.settings import ConfigError
from sidecar.settings.model import AddonSpec

if TYPE_CHECKING:
    from sidecar.addons.metrics import Metrics

log = logging.getLogger("ringside")

HOOKS = ("headers", "request", "routed", "attempt", "attempt_done", "response", "error", "done")

SHORT_CIRCUIT = frozenset({"headers", "request"})  # hooks after which flow.response ends the chain
DECIDING = frozenset({"headers", "request", "routed", "attempt"})  # an exception ends the request
LOG_EVERY_SECONDS = 60.0  # an addon failing on every request: one traceback a minute per hook

Handler = Callable[..., Any]


class _Done:
    """An awaitable that is already finished: `await` on it returns at once, no event loop."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # never reached: makes this a generator that is finished at its first step


DONE = _Done()


class Pipeline:
    def __init__(self, addons: Sequence[object], metrics: Metrics | None = None) -> None:
        self.addons = tuple(addons)
        self.metrics = metrics
        # hook → (its handlers in order, whether flow.response set by one ends the chain)
        self._chains: dict[str, tuple[tuple[Handler, ...], bool]] = {}
        self._names: dict[str, tuple[str, ...]] = {}  # hook → its handlers' addon names
        for hook in HOOKS:
            found, names = [], []
            for addon in self.addons:
                method = getattr(addon, hook, None)
                if callable(method):
                    found.append(method)
                    names.append(addon_name(addon))
            self._chains[hook] = (tuple(found), hook in SHORT_CIRCUIT)
            self._names[hook] = tuple(names)
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}  # → (logged at, unlogged)

    def run(self, hook: str, flow: Any, attempt: Any = None) -> Awaitable[None]:
        """Call `hook` on every addon in order, with `attempt` too for the attempt hooks;
        stops early once `flow.response` is set (after the `headers` and `request` hooks).

        What is returned is already done, and awaiting it costs nothing, unless a hook
        handed back an awaitable: then the rest of the chain runs after it, in a coroutine.
        An addon's exception is handled as the module docstring says: only a deciding hook's
        leaves this method (a GatewayError). (Calls with a fixed number of arguments: a
        `*args` call builds a list and a tuple per handler, ~25 times a request.)"""
        handlers, stops = self._chains[hook]
        for method in handlers:
            try:
                pending = method(flow) if attempt is None else method(flow, attempt)
            except Exception as exc:
                self._failed(hook, handlers.index(method), flow, exc)
                continue
            if pending is not None and inspect.isawaitable(pending):  # other values: ignored
                return self._resume(pending, hook, handlers.index(method), flow, attempt)
            if stops and flow.response is not None:
                break
        return DONE

    async def _resume(
        self, pending: Awaitable[None], hook: str, position: int, flow: Any, attempt: Any
    ) -> None:
        """Wait for what the handler at `position` handed back, then run the rest."""
        handlers, stops = self._chains[hook]
        try:
            await pending
        except Exception as exc:
            self._failed(hook, position, flow, exc)
        if stops and flow.response is not None:
            return
        for later in range(position + 1, len(handlers)):
            method = handlers[later]
            try:
                pending = method(flow) if attempt is None else method(flow, attempt)
                if pending is not None and inspect.isawaitable(pending):
                    await pending
            except Exception as exc:
                self._failed(hook, later, flow, exc)
                continue
            if stops and flow.response is not None:
                return

    def _failed(self, hook: str, position: int, flow: Any, exc: Exception) -> None:
        """The handler at `position` raised `exc`: report it, and for a deciding hook end the
        request (raise); for an observing one, return and let the chain go on."""
        deciding = hook in DECIDING
        if deciding and isinstance(exc, GatewayError):
            raise exc  # raised on purpose: the addon's answer
        addon = self._names[hook][position]
        if self.metrics is not None:
            self.metrics.tally.inc(self.metrics.addon_errors.labels(addon, hook))
        now = time.monotonic()
        logged_at, unlogged = self._logged.get((addon, hook), (-LOG_EVERY_SECONDS, 0))
        if now - logged_at < LOG_EVERY_SECONDS:
            self._logged[addon, hook] = (logged_at, unlogged + 1)
        else:
            self._logged[addon, hook] = (now, 0)
            log.error(
                "addon %s raised in its %s hook (request %s); %s%s",
                addon, hook, getattr(flow, "id", "?"),
                "the request is answered 500 internal_error" if deciding
                else "ignored: the client's answer is unchanged",
                f"; {unlogged} more since the last report (counted in "
                "ringside_addon_errors_total)" if unlogged else "",
                exc_info=exc,
            )  # fmt: skip
        if deciding:
            raise internal_error(getattr(flow, "id", "?")) from exc


def addon_name(addon: object) -> str:
    """`module:Class`, as a config's `addons:` entry names it (a label of bounded values)."""
    cls = type(addon)
    return f"{cls.__module__}:{cls.__qualname__}"


_PREFIXES = ("on",)  # of normalized names (lower case, no underscores): `on_request`, `onRequest`
_START = ("start", "started", "begin", "hook")  # `attempt_start` meant `attempt`
_END = ("end", "ended", "finished", "complete", "completed", "done")  # `attempt_end`: attempt_done
_ALIASES = {"requestheaders": "headers", "responseheaders": "response"}  # mitmproxy's hooks
_NORMALIZED = {hook.replace("_", ""): hook for hook in HOOKS}


def _meant(name: str) -> str | None:
    """The hook that a public method `name` (not a hook) probably meant, or None: the same
    name in other case or without underscores, a hook with a common prefix or suffix
    (on_, _start, _end, ...), or a near spelling of about the same length (difflib)."""
    normal = name.lower().replace("_", "")
    bases = {normal}
    for prefix in _PREFIXES:
        if normal.startswith(prefix):
            bases.add(normal[len(prefix) :])
    for base in list(bases):
        if base in _NORMALIZED:
            return _NORMALIZED[base]
        if base in _ALIASES:
            return _ALIASES[base]
        for suffix in _START + _END:
            stem = base[: -len(suffix)] if base.endswith(suffix) else ""
            if stem in _NORMALIZED:
                if suffix in _START:
                    return _NORMALIZED[stem]
                return "attempt_done" if stem == "attempt" else "done"
    if len(normal) < 4:
        return None
    for close in difflib.get_close_matches(normal, _NORMALIZED, n=3, cutoff=0.85):
        if abs(len(close) - len(normal)) <= 1:
            return _NORMALIZED[close]
    return None


def misspelt_hooks(addon: object) -> list[str]:
    """A problem for each public method of `addon` whose name is close to a hook's but is not
    one: such a method would never be called, and nothing would say so."""
    problems = []
    for name in dir(type(addon)):
        if name.startswith("_") or name in HOOKS:
            continue
        value = inspect.getattr_static(addon, name, None)
        if not (inspect.isroutine(value) or isinstance(value, (staticmethod, classmethod))):
            continue
        meant = _meant(name)
        if meant is not None:
            problems.append(
                f"its method {name}() is not a hook and would never be called: did you mean "
                f"{meant}()? (a helper's name starts with an underscore; hooks: "
                f"{', '.join(HOOKS)})"
            )
    return problems


def load_addon(spec: AddonSpec) -> object:
    """Import `package.module:ClassName` and build it with the configured options."""
    module_name, _, class_name = spec.path.partition(":")
    module = importlib.import_module(module_name)
    factory = getattr(module, class_name)
    addon = factory(**spec.options) if spec.options else factory()
    problems = misspelt_hooks(addon)
    if problems:
        raise ConfigError(problems)
    return addon
