"""The admin listener: health, readiness, Prometheus metrics, customer usage, the API's
OpenAPI document.

/healthz, /readyz and /openapi.yaml are always open (the kubelet probes the first two; the
third describes the api listener and holds nothing of the config). /metrics names customers and
their spend: with `admin.metrics_token` set it answers only a request that carries that token
as `Authorization: Bearer <token>` (what Prometheus' `authorization` scrape setting sends)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from sidecar.addons.metrics import exposition
from sidecar.api.common import bearer_matches
from sidecar.api.usage import customer_usage
from sidecar.appkeys import STATE


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not state.ready:
        return web.json_response({"status": "starting"}, status=503)
    return web.json_response({"status": "ready"})


METRICS_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ringside-metrics"'}


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    token = state.settings.admin.metrics_token
    if token is not None and not bearer_matches(request, token):
        problem = "wrong token" if "Authorization" in request.headers else "no token"
        return web.Response(
            status=401,
            text=f"{problem}: /metrics needs admin.metrics_token, sent as 'Authorization: Bearer "
            "<token>' (Prometheus: the authorization section of the scrape config)\n",
            headers=METRICS_CHALLENGE,
        )
    holder = state.holder
    if holder is None:
        return web.Response(status=503, text="starting\n")
    if not holder.current.settings.metrics_enabled:
        return web.Response(status=404, text="metrics are disabled (metrics.enabled: false)\n")
    payload = exposition(holder.current.services.metrics)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


OPENAPI_CONTENT_TYPE = "application/yaml"


def openapi_handler(document: bytes) -> Callable[[web.Request], Awaitable[web.Response]]:
    """GET /openapi.yaml: the api listener as OpenAPI 3.1 (sidecar/openapi.yaml, read once)."""

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=document, headers={"Content-Type": OPENAPI_CONTENT_TYPE})

    return openapi


def add_admin_routes(app: web.Application) -> None:
    document = resources.files("sidecar").joinpath("openapi.yaml").read_bytes()
    app.router.add_get("/openapi.yaml", openapi_handler(document))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/customers/{id}/usage", customer_usage)
