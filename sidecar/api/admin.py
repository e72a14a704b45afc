"""The admin listener: health, readiness, Prometheus metrics."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from sidecar.addons.metrics import exposition
from sidecar.api.usage import customer_usage
from sidecar.app import STATE


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not state.ready:
        return web.json_response({"status": "starting"}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    holder = request.app[STATE].holder
    if holder is None:
        return web.Response(status=503, text="starting\n")
    if not holder.current.settings.metrics_enabled:
        return web.Response(status=404, text="metrics are disabled (metrics.enabled: false)\n")
    payload = exposition(holder.current.services.metrics)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/customers/{id}/usage", customer_usage)
