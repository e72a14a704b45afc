"""The injector's HTTPS server: `POST /mutate` (AdmissionReview v1), `GET /healthz`, `GET /readyz`.

Every answer to a review the webhook can read is 200 with an AdmissionReview: allowed with a
JSON Patch, allowed without one, or (an invalid override annotation) denied with a message the
pod's creator sees. A body that is not such a review is 400 (413 over `MAX_REVIEW_BYTES`) with a
JSON error: the API server then applies the configuration's failurePolicy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import orjson
from aiohttp import web

from sidecar.inject.options import InjectDefaults
from sidecar.inject.patch import Decision, MalformedPod, decide
from sidecar.inject.review import BadReview, read_review, review_answer
from sidecar.inject.tls import ReloadingTLS
from sidecar.server_limits import GuardedRunner, ListenerGuard
from sidecar.settings.model import Limits

log = logging.getLogger("ringside.inject")

# The API server refuses request bodies over 3 MiB, so no review of a storable Pod is larger.
MAX_REVIEW_BYTES = 4 * 1024 * 1024

DEFAULTS = web.AppKey("defaults", InjectDefaults)
DRAINING = web.AppKey("draining", asyncio.Event)


def error(status: int, code: str, message: str) -> web.Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return web.Response(status=status, body=body, content_type="application/json")


async def mutate(request: web.Request) -> web.Response:
    too_large = f"the review is over {MAX_REVIEW_BYTES} bytes"
    if (request.content_length or 0) > MAX_REVIEW_BYTES:
        return error(413, "review_too_large", too_large)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:  # a chunked body past client_max_size
        return error(413, "review_too_large", too_large)
    try:
        review = read_review(body)
        if review.operation == "CREATE":
            decision = decide(review.pod, request.app[DEFAULTS])
        else:
            decision = Decision("skipped")
    except (BadReview, MalformedPod) as exc:
        log.warning("bad admission review from %s: %s", request.remote, exc)
        return error(400, "bad_admission_review", str(exc))
    if decision.outcome == "injected":
        log.info("injected the ringside sidecar into %s", review.pod_name)
    elif decision.outcome == "denied":
        log.warning("refused %s: %s", review.pod_name, decision.denial)
    for warning in decision.warnings:
        log.warning("%s: %s", review.pod_name, warning)
    return web.Response(body=review_answer(review.uid, decision), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[DRAINING].is_set():
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready"})


def create_app(defaults: InjectDefaults) -> web.Application:
    app = web.Application(client_max_size=MAX_REVIEW_BYTES)
    app[DEFAULTS] = defaults
    app[DRAINING] = asyncio.Event()
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve(
    host: str, port: int, tls: ReloadingTLS, defaults: InjectDefaults, drain_seconds: float
) -> None:
    """Serve until SIGTERM or SIGINT; then fail /readyz for `drain_seconds` (the Service's
    endpoints drop this pod) while still answering reviews, and stop."""
    app = create_app(defaults)
    # the sidecar's own connection bounds (header, body and idle deadlines, a connection cap):
    # a client that never finishes its headers must not hold the webhook's connections
    limits = Limits()  # the defaults: a 10 s header deadline, 256 connections
    guard = ListenerGuard("webhook", lambda: limits)
    runner = GuardedRunner(app, guard, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=tls.context).start()
        shown = f"[{host}]" if ":" in host else host
        log.info(
            "ringside inject-webhook ready on https://%s:%d/mutate (image %s, config map %s)",
            shown,
            port,
            defaults.image,
            defaults.config_map,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        app[DRAINING].set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(drain_seconds)
    finally:
        await runner.cleanup()
