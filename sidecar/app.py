"""The two aiohttp applications (api and admin) and what lives as long as they do."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace

from aiohttp import web

from sidecar.addons.circuits import CircuitBreakers
from sidecar.addons.metrics import Metrics, flush_periodically
from sidecar.addons.usage import UsageWriter
from sidecar.api.admin import add_admin_routes
from sidecar.api.chat import chat_completions
from sidecar.api.embeddings import create_embeddings
from sidecar.api.models import list_models, retrieve_model
from sidecar.api.passthrough import passthrough_or_unknown
from sidecar.api.responses import create_response
from sidecar.api.stored_responses import stored_response
from sidecar.api.tokens import create_client_token, preflight
from sidecar.appkeys import STATE, GatewayState
from sidecar.prices_update import update_periodically
from sidecar.runtime import Runtime, RuntimeHolder, Services
from sidecar.settings import Settings
from sidecar.settings.model import HostPort, Listen
from sidecar.settings.watch import watch_file
from sidecar.stores import open_stores

log = logging.getLogger("ringside")

GAUGE_WAIT_SECONDS = 0.5  # startup waits this long for the budget gauges' first reading


def with_listen(settings: Settings, api: HostPort | None, admin: HostPort | None) -> Settings:
    """Command-line overrides of the listeners."""
    return replace(
        settings,
        listen=Listen(api=api or settings.listen.api, admin=admin or settings.listen.admin),
    )


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    metrics = Metrics()
    stores = await open_stores(state.initial_settings.storage, state.workers)
    usage = UsageWriter(stores.budgets)
    services = Services(
        metrics=metrics,
        circuits=CircuitBreakers(metrics),
        store=stores.idempotency,
        budgets=stores.budgets,
        usage=usage,
        limiter=stores.limiter,
    )
    try:
        runtime = Runtime(state.initial_settings, services)
    except BaseException:
        await stores.close()
        raise
    gauges = asyncio.create_task(runtime.budget.refresh())  # spent gauges from the store
    # ready with them when the store answers at once; a store that is down must not hold us up
    await asyncio.wait({gauges}, timeout=GAUGE_WAIT_SECONDS)
    flusher = asyncio.create_task(flush_periodically(metrics))
    state.holder = RuntimeHolder(state.config_path, runtime)
    watcher = asyncio.create_task(
        watch_file(state.config_path, state.holder.reload, state.watch_interval)
    )
    background = [watcher, gauges, flusher]
    prices = state.initial_settings.prices
    if prices.auto_update:  # read at start (sidecar/prices_update.py)
        background.append(asyncio.create_task(update_periodically(state.holder, prices)))
    try:
        yield
    finally:
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        metrics.tally.flush()
        await usage.close()  # the queued usage records, before the stores close
        services.http1.close()
        await stores.close()


def create_apps(state: GatewayState) -> tuple[web.Application, web.Application]:
    api = web.Application()
    api[STATE] = state
    api.cleanup_ctx.append(_lifecycle)
    api.router.add_post("/v1/chat/completions", chat_completions)
    api.router.add_post("/v1/embeddings", create_embeddings)
    api.router.add_post("/v1/responses", create_response)
    api.router.add_get("/v1/responses/{id}", stored_response)
    api.router.add_delete("/v1/responses/{id}", stored_response)
    api.router.add_post("/v1/responses/{id}/cancel", stored_response)
    api.router.add_get("/v1/responses/{id}/input_items", stored_response)
    api.router.add_get("/v1/models", list_models)
    api.router.add_get("/v1/models/{ref:[\\s\\S]+}", retrieve_model)
    api.router.add_post("/v1/client_tokens", create_client_token)
    api.router.add_route("OPTIONS", "/v1/chat/completions", preflight)
    api.router.add_route("OPTIONS", "/v1/embeddings", preflight)
    api.router.add_route("OPTIONS", "/v1/responses", preflight)
    api.router.add_route("OPTIONS", "/v1/models", preflight)
    api.router.add_route("OPTIONS", "/v1/models/{ref:[\\s\\S]+}", preflight)
    # last: what nothing else serves, a configured pass-through path or the 404
    api.router.add_route("*", "/{path:[\\s\\S]*}", passthrough_or_unknown)

    admin = web.Application()
    admin[STATE] = state
    add_admin_routes(admin)
    return api, admin
