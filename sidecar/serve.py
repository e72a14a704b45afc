"""The serving lifecycle of one process: both listeners up, ready, signals, drain, stop.

`ringside serve` runs it directly, or once per worker under `sidecar.supervisor`."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time

from sidecar.settings import ConfigError, Settings

log = logging.getLogger("ringside")

GC_YOUNG_THRESHOLD = 10_000  # objects surviving between young collections (CPython's is 700)


def settle_heap() -> None:
    """Keep what startup built (modules, config, compiled routes) out of every later garbage
    collection, and collect the young generation less often: requests free their objects by
    reference counting, so frequent collections only re-scan long-lived state.

    Only the young generations are collected first: startup's few cycles (a dozen objects) are
    still young, and a full collection would re-scan every module object for ≈10 ms of startup
    to find nothing more."""
    gc.collect(1)
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


async def serve(settings: Settings, config_path: str, started: float, workers: int = 1) -> None:
    from aiohttp import web

    from sidecar.app import create_apps
    from sidecar.appkeys import GatewayState
    from sidecar.server_limits import (
        GuardedRunner,
        GuardedServer,
        ListenerGuard,
        api_connection_ceiling,
    )
    from sidecar.shutdown import CUT_SECONDS, Drain

    state = GatewayState(config_path, settings, workers=workers)
    reuse_port = workers > 1
    api_app, admin_app = create_apps(state)
    # each listener's deadlines and connection cap (limits.*, read again at each connection)
    api_guard = ListenerGuard(
        "api", lambda: state.settings.limits, api_connection_ceiling(settings.limits)
    )
    admin_guard = ListenerGuard("admin", lambda: state.settings.limits)
    # the drain (sidecar/shutdown.py) has ended every api request before the runners stop
    api_runner = GuardedRunner(
        api_app, api_guard, handler_cancellation=True, access_log=None,
        shutdown_timeout=CUT_SECONDS,
    )  # fmt: skip
    admin_runner = GuardedRunner(
        admin_app, admin_guard, access_log=None, shutdown_timeout=CUT_SECONDS
    )
    await api_runner.setup()
    await admin_runner.setup()
    api_guard.attach(state.runtime.services.metrics)
    admin_guard.attach(state.runtime.services.metrics)
    state.body_memory.attach(state.runtime.services.metrics)
    listen = settings.listen
    api_site = web.TCPSite(
        api_runner, listen.api.host, listen.api.port, backlog=1024, reuse_port=reuse_port
    )
    await api_site.start()
    await web.TCPSite(
        admin_runner, listen.admin.host, listen.admin.port, reuse_port=reuse_port
    ).start()
    settle_heap()
    from sidecar.structured import warm_up

    # ready first; what only some requests need is imported off the event loop
    warm_up_task = asyncio.get_running_loop().run_in_executor(None, warm_up)
    mode = "open mode" if settings.open_mode else f"{len(settings.keys)} keys"
    log.info(
        "ringside ready in %.0f ms: api http://%s/v1, admin http://%s (%s, config %s)",
        (time.perf_counter() - started) * 1000,
        listen.api,
        listen.admin,
        mode,
        config_path,
    )

    loop = asyncio.get_running_loop()
    assert isinstance(api_runner.server, GuardedServer)
    drain = Drain(state, api_runner.server, [api_site])
    loop.add_signal_handler(signal.SIGTERM, drain.begin, signal.SIGTERM)
    loop.add_signal_handler(signal.SIGINT, drain.begin, signal.SIGINT)
    loop.add_signal_handler(signal.SIGHUP, lambda: state.holder and state.holder.reload())
    await drain.started.wait()
    await drain.run()  # /readyz fails, new requests for a delay, then in-progress ones finish
    await warm_up_task
    await api_runner.cleanup()  # the usage writer writes out its queue, the stores close
    await admin_runner.cleanup()


def run_worker(settings: Settings, config_path: str, started: float, workers: int) -> int:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    try:
        with runner:
            runner.run(serve(settings, config_path, started, workers))
    except ConfigError as exc:  # e.g. an addon that cannot be loaded
        print(exc, file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ringside: cannot listen: {exc}", file=sys.stderr)
        return 3
    return 0
