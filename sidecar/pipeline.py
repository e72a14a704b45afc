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
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any

from sidecar.settings.model import AddonSpec

HOOKS = ("headers", "request", "routed", "attempt", "attempt_done", "response", "error", "done")

SHORT_CIRCUIT = frozenset({"headers", "request"})  # hooks after which flow.response ends the chain

Handler = Callable[..., Any]


class _Done:
    """An awaitable that is already finished: `await` on it returns at once, no event loop."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # never reached: makes this a generator that is finished at its first step


DONE = _Done()


class Pipeline:
    def __init__(self, addons: Sequence[object]) -> None:
        self.addons = tuple(addons)
        # hook → (its handlers in order, whether flow.response set by one ends the chain)
        self._chains: dict[str, tuple[tuple[Handler, ...], bool]] = {}
        for hook in HOOKS:
            found = []
            for addon in self.addons:
                method = getattr(addon, hook, None)
                if callable(method):
                    found.append(method)
            self._chains[hook] = (tuple(found), hook in SHORT_CIRCUIT)

    def run(self, hook: str, flow: Any, *args: Any) -> Awaitable[None]:
        """Call `hook` on every addon in order; stops early once `flow.response` is set
        (after the `headers` and `request` hooks).

        What is returned is already done, and awaiting it costs nothing, unless a hook
        handed back an awaitable: then the rest of the chain runs after it, in a coroutine."""
        handlers, stops = self._chains[hook]
        for index, method in enumerate(handlers, 1):
            pending = method(flow, *args)
            if pending is not None and inspect.isawaitable(pending):  # other values: ignored
                return self._resume(pending, handlers[index:], flow, args, stops)
            if stops and flow.response is not None:
                break
        return DONE

    @staticmethod
    async def _resume(
        pending: Awaitable[None],
        rest: tuple[Handler, ...],
        flow: Any,
        args: tuple[Any, ...],
        stops: bool,
    ) -> None:
        await pending
        if stops and flow.response is not None:
            return
        for method in rest:
            pending = method(flow, *args)
            if pending is not None and inspect.isawaitable(pending):
                await pending
            if stops and flow.response is not None:
                return


def load_addon(spec: AddonSpec) -> object:
    """Import `package.module:ClassName` and build it with the configured options."""
    module_name, _, class_name = spec.path.partition(":")
    module = importlib.import_module(module_name)
    factory = getattr(module, class_name)
    return factory(**spec.options) if spec.options else factory()
