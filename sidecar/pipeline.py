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
        self._handlers: dict[str, tuple[tuple[Handler, bool], ...]] = {}
        self._all_sync: dict[str, bool] = {}
        for hook in HOOKS:
            found = []
            for addon in self.addons:
                method = getattr(addon, hook, None)
                if callable(method):
                    found.append((method, inspect.iscoroutinefunction(method)))
            self._handlers[hook] = tuple(found)
            self._all_sync[hook] = not any(is_async for _, is_async in found)

    def run(self, hook: str, *args: Any) -> Awaitable[None]:
        """Call `hook` on every addon in order; stops early once `flow.response` is set.

        A hook with only synchronous handlers runs right here, and what is returned is
        already done: awaiting it costs no coroutine and no trip through the event loop."""
        if self._all_sync[hook]:
            flow = args[0]
            stops = hook in SHORT_CIRCUIT
            for method, _ in self._handlers[hook]:
                method(*args)
                if stops and flow.response is not None:
                    break
            return DONE
        return self._run_async(hook, args)

    async def _run_async(self, hook: str, args: tuple[Any, ...]) -> None:
        flow = args[0]
        stops = hook in SHORT_CIRCUIT
        for method, is_async in self._handlers[hook]:
            if is_async:
                await method(*args)
            else:
                method(*args)
            if stops and flow.response is not None:
                return


def load_addon(spec: AddonSpec) -> object:
    """Import `package.module:ClassName` and build it with the configured options."""
    module_name, _, class_name = spec.path.partition(":")
    module = importlib.import_module(module_name)
    factory = getattr(module, class_name)
    return factory(**spec.options) if spec.options else factory()
