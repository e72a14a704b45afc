"""Google access tokens for the vertex kind, from application default credentials.

`GoogleToken` is the `authorize` hook of a vertex provider's `HttpProvider`: it sets
`Authorization: Bearer <token>` on each built request from the token it holds. The token comes
from `google.auth.default()` with the cloud-platform scope, so from wherever Google's own SDKs
find credentials: a service-account key file named by GOOGLE_APPLICATION_CREDENTIALS (its
`token_uri` is where the token is fetched), GKE workload identity and other Google Cloud
runtimes through the metadata server, gcloud's application-default user credentials.

Fetching and refreshing a token is blocking network I/O inside google-auth: it runs in a worker
thread, never on the event loop, and off the request path. A background task, started when the
provider's client is built (with the app, and again on a config reload), fetches the first
token at once and each next one REFRESH_BEFORE seconds before the held one expires; a failed
fetch is retried after 1, 2, 4 … up to RETRY_MAX seconds while the held token stays in use.
The token is fetched the way the provider's own calls leave: through its `proxy:` (`""`:
direct; unset: the environment's HTTPS_PROXY / NO_PROXY) and trusting its `tls.ca_file`; the
metadata server is always reached directly (it is link-local: no proxy can reach it). Only a
call made before the very first token arrives waits for it; with no usable token the
call fails as the provider being unavailable (it escalates). The task holds the GoogleToken
weakly and ends when the provider's client is dropped (a reload replaced it). google-auth is
imported in the worker thread, the first time a token is fetched: it is the optional `vertex`
extra, checked at config load.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Callable
from datetime import UTC
from functools import partial
from typing import Any

from sidecar.errors import Outcome, UpstreamError
from sidecar.providers.base import HttpRequest
from sidecar.settings.model import ProviderSettings

log = logging.getLogger("ringside")

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
REFRESH_BEFORE = 300.0  # seconds before expiry a token is replaced
MIN_WAIT = 1.0  # between two fetches, at least (a token issued nearly expired)
RETRY_MAX = 30.0  # the longest pause after failed fetches
EXPIRY_MARGIN = 10.0  # a token this close to its expiry is not sent any more
FETCH_TIMEOUT = 10.0  # seconds for one HTTP exchange of google-auth (its default is 120)
UNKNOWN_LIFETIME = 3000.0  # refresh after this long when credentials give no expiry
# the metadata server's names (google-auth's defaults): never through a proxy
METADATA_HOSTS = ("metadata.google.internal", "metadata", "169.254.169.254")


def application_default() -> Any:
    """google-auth's application default credentials, scoped for Vertex AI (in a worker
    thread: finding them may ask the metadata server)."""
    import google.auth

    credentials, _project = google.auth.default(scopes=[SCOPE])
    return credentials


def metadata_hosts() -> list[str]:
    """The metadata server's hosts, with those GCE_METADATA_HOST and GCE_METADATA_IP name
    (where google-auth then looks)."""
    hosts = list(METADATA_HOSTS)
    for name in ("GCE_METADATA_HOST", "GCE_METADATA_IP"):
        value = os.environ.get(name, "").strip()
        if value:
            hosts.append(value.rsplit(":", 1)[0] if value.count(":") == 1 else value)
    return hosts


def proxies_of(proxy: str) -> dict[str, str]:
    """requests' proxies for a provider's `proxy:` URL: every URL through it but the metadata
    server's (a per-host "" is requests' "no proxy here"; its `no_proxy` key is read only with
    the environment's proxies, which a provider's own proxy replaces)."""
    proxies = {"http": proxy, "https": proxy}
    for host in metadata_hosts():
        proxies[f"http://{host}"] = proxies[f"https://{host}"] = ""
    return proxies


def http_transport(proxy: str | None = None, ca_file: str | None = None) -> Callable[..., Any]:
    """google-auth's HTTP transport (requests), its timeout bounded by FETCH_TIMEOUT, leaving
    as the provider's calls do: `proxy` None takes the environment's proxies (as requests
    does), "" goes direct, a URL is the proxy for all but the metadata server; `ca_file`
    the provider's CA bundle."""
    import google.auth.transport.requests
    import requests

    session = requests.Session()
    if proxy is not None:  # the provider's own: the environment's proxies do not apply
        session.trust_env = False
        if proxy:
            session.proxies = proxies_of(proxy)
    if ca_file:
        session.verify = ca_file
    request = google.auth.transport.requests.Request(session)

    def bounded(
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Any = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        bound = min(timeout or FETCH_TIMEOUT, FETCH_TIMEOUT)
        return request(url, method=method, body=body, headers=headers, timeout=bound, **kwargs)

    return bounded


def no_token(provider: str, detail: str) -> UpstreamError:
    """A call without a usable token: the provider is unavailable (escalates), never the
    request's fault."""
    return UpstreamError(
        Outcome.UNAVAILABLE,
        f"provider {provider!r} has no Google access token: {detail}",
        reason="credentials",
    )


class GoogleToken:
    """One vertex provider's access token, kept fresh in the background (see the module)."""

    def __init__(
        self,
        provider: str,
        credentials: Callable[[], Any] = application_default,
        transport: Callable[[], Callable[..., Any]] = http_transport,
        clock: Callable[[], float] = time.time,
        refresh_before: float = REFRESH_BEFORE,
        min_wait: float = MIN_WAIT,
    ) -> None:
        self.provider = provider
        self._make_credentials = credentials
        self._make_transport = transport
        self._clock = clock
        self.refresh_before = refresh_before
        self.min_wait = min_wait
        self._credentials: Any = None
        self._transport: Callable[..., Any] | None = None
        self.token: str | None = None
        self.expiry: float | None = None  # epoch seconds; None: the credentials gave none
        self.fetches = 0  # successful ones
        self._failure: str | None = None
        self._failures = 0
        self._attempt: asyncio.Task[float] | None = None
        self._keeper: asyncio.Task[None] | None = None
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # built outside the app (a test of the adapter): started by the first call
        self.start()

    def start(self) -> None:
        """Fetch the first token now and keep the token fresh from then on (idempotent)."""
        if self._keeper is not None:
            return
        loop = asyncio.get_running_loop()
        self._attempt = loop.create_task(self._fetch())
        self._keeper = loop.create_task(_keep_fresh(weakref.ref(self), self._attempt))
        weakref.finalize(self, self._keeper.cancel)

    def _usable(self) -> bool:
        return self.token is not None and (
            self.expiry is None or self._clock() < self.expiry - EXPIRY_MARGIN
        )

    async def __call__(self, request: HttpRequest) -> HttpRequest:
        """`request` with `Authorization: Bearer <token>` (the authorize hook)."""
        token = self.token if self._usable() else await self._wait()
        headers = {**request.headers, "Authorization": f"Bearer {token}"}
        return HttpRequest(request.url, headers, request.body, request.method)

    async def _wait(self) -> str:
        """The token once the fetch under way ends; a failure when none is under way."""
        self.start()
        attempt = self._attempt
        if attempt is not None and not attempt.done():
            await asyncio.shield(attempt)
        if self._usable():
            assert self.token is not None
            return self.token
        raise no_token(self.provider, self._failure or "it expired and the refresh is late")

    def begin_fetch(self) -> asyncio.Task[float]:
        self._attempt = asyncio.get_running_loop().create_task(self._fetch())
        return self._attempt

    async def _fetch(self) -> float:
        """Fetch a token (in a worker thread); the seconds until the next fetch."""
        try:
            token, expiry = await asyncio.to_thread(self._fetch_blocking)
        except Exception as exc:  # any failure of google-auth: kept, retried, never raised
            self._failures += 1
            self._failure = f"{type(exc).__name__}: {exc}"
            log.warning(
                "provider %s: fetching a Google access token failed (%s); %s",
                self.provider, self._failure,
                "the held token stays in use" if self._usable() else "calls fail until one comes",
            )  # fmt: skip
            return min(RETRY_MAX, 2.0 ** (self._failures - 1))
        self.token, self.expiry, self._failure, self._failures = token, expiry, None, 0
        self.fetches += 1
        if expiry is None:
            return UNKNOWN_LIFETIME
        return max(self.min_wait, expiry - self._clock() - self.refresh_before)

    def _fetch_blocking(self) -> tuple[str, float | None]:
        if self._credentials is None:
            self._credentials = self._make_credentials()
        if self._transport is None:
            self._transport = self._make_transport()
        credentials = self._credentials
        credentials.refresh(self._transport)
        token = credentials.token
        if not isinstance(token, str) or not token:
            raise LookupError("the credentials gave no access token")
        expiry = credentials.expiry  # naive UTC, google-auth's convention
        return token, None if expiry is None else expiry.replace(tzinfo=UTC).timestamp()


async def _keep_fresh(ref: weakref.ref[GoogleToken], first: asyncio.Task[float]) -> None:
    """Fetch after fetch, each when the one before says; ends when the GoogleToken is gone."""
    delay = await first
    while True:
        await asyncio.sleep(delay)
        holder = ref()
        if holder is None:
            return
        attempt = holder.begin_fetch()
        del holder  # held only while a fetch runs
        delay = await attempt


def authorizer(settings: ProviderSettings) -> GoogleToken:
    """The authorize hook of one vertex provider's client (built with the app)."""
    ca_file = settings.tls.ca_file if settings.tls is not None else None
    return GoogleToken(settings.name, transport=partial(http_transport, settings.proxy, ca_file))
