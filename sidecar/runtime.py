"""Everything compiled from one Settings: router, provider clients, addon chain, cascade.

A Runtime is immutable once built; a config reload builds a new one and swaps it under the
app's key, so requests in flight finish with the Runtime they started with. Building one has
no effect on the long-lived Services: what it changes there waits for `activate`, which runs
only for a Runtime that is accepted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import orjson

from sidecar.addons.accesslog import AccessLog
from sidecar.addons.auth import Auth
from sidecar.addons.budget import BudgetAddon
from sidecar.addons.circuits import CircuitAddon, CircuitBreakers
from sidecar.addons.idempotency import Idempotency
from sidecar.addons.metrics import Metrics, MetricsAddon
from sidecar.addons.ratelimit import RateLimits
from sidecar.addons.usage import UsageAddon, UsageWriter
from sidecar.cascade import Cascade
from sidecar.http1 import Http1Client
from sidecar.outage import Outage
from sidecar.passthrough import PassthroughRoute, PassthroughTable
from sidecar.pipeline import Pipeline, load_addon
from sidecar.prices import PriceData
from sidecar.providers import build_client
from sidecar.providers.base import ProviderClient
from sidecar.routing import Router
from sidecar.settings import ConfigError, Settings, load_settings
from sidecar.stored_responses import ResponseOwners, stored_route
from sidecar.stores import Store
from sidecar.stores.budget import BudgetStore
from sidecar.stores.ratelimit_base import RateLimiter
from sidecar.stores.ratelimit_memory import MemoryLimiter
from sidecar.structured import SchemaCache

log = logging.getLogger("ringside")


@dataclass(slots=True)
class Services:
    """Long-lived objects that outlive config reloads."""

    metrics: Metrics
    circuits: CircuitBreakers
    store: Store  # storage: opened at start, closed at shutdown; a change needs a restart
    budgets: BudgetStore  # budget holds, spent per period, usage records (same backend)
    usage: UsageWriter  # writes usage records off the request path
    schemas: SchemaCache = field(default_factory=SchemaCache)  # compiled response_formats
    limiter: RateLimiter = field(default_factory=MemoryLimiter)  # GCRA state, kept on reload
    http1: Http1Client = field(default_factory=Http1Client)  # every upstream call
    outages: dict[str, Outage] = field(default_factory=dict)  # by store: see `outage`
    # which provider made each native response passed on (its stored-response calls go there)
    response_owners: ResponseOwners = field(default_factory=ResponseOwners)

    def outage(self, store: str) -> Outage:
        """The outage state of `store` (budget, idempotency), kept across reloads: a reload
        during an outage neither logs it again nor loses the end of it."""
        found = self.outages.get(store)
        if found is None:
            found = self.outages[store] = Outage(store, self.metrics)
        return found


class Runtime:
    def __init__(self, settings: Settings, services: Services) -> None:
        self.settings = settings
        self.services = services
        self.router = Router(settings)
        self.providers: dict[str, ProviderClient] = {
            name: build_client(provider, services.http1)
            for name, provider in settings.providers.items()
        }
        self.auth = Auth(settings)
        self.budget = BudgetAddon(
            settings, services.budgets, services.metrics, services.outage("budget")
        )
        addons: list[object] = [
            MetricsAddon(services.metrics, settings),
            UsageAddon(services.usage),
            self.auth,
            RateLimits(settings, services.limiter, services.metrics),
            self.budget,  # its attempt hook runs before the circuits' probe is taken
            CircuitAddon(services.circuits),
            # request hooks: auth, then rate limits, then idempotency (a replay is no new call)
            Idempotency(
                services.store.idempotency,
                fail_open=settings.storage.fail_open,
                outage=services.outage("idempotency"),
            ),
        ]
        if settings.access_log:
            addons.append(AccessLog())
        for spec in settings.addons:
            try:
                addons.append(load_addon(spec))
            except Exception as exc:
                raise ConfigError(
                    [f"{settings.source}: addons: cannot load {spec.path}: {exc}"]
                ) from None
        self.pipeline = Pipeline(addons, services.metrics)
        self.cascade = Cascade(
            self.pipeline, self.providers, settings.rewrite, services.circuits.is_open
        )
        self.passthrough = PassthroughTable(settings.passthrough, self.providers)
        entries = _model_entries(settings)
        self.models_body = orjson.dumps({"object": "list", "data": entries})
        self.model_bodies = {str(entry["id"]): orjson.dumps(entry) for entry in entries}

    def stored_route(self, response_id: str) -> PassthroughRoute | None:
        """Where a stored response's call goes (sidecar/stored_responses.py)."""
        return stored_route(response_id, self.services.response_owners, self.passthrough)

    def remember_response(self, response: object, provider: str) -> None:
        """Note which provider made a native response (its `id`), for its stored calls."""
        if isinstance(response, dict):
            self.services.response_owners.remember(response.get("id"), provider)

    def activate(self) -> None:
        """Put this config in force on the long-lived Services (circuit breaker settings,
        budget gauges). Building a Runtime changes nothing outside it, so a config refused
        half-way (an addon that fails to load) leaves the running one whole: the holder calls
        this once the Runtime is accepted, at start and after a successful reload."""
        for name, provider in self.settings.providers.items():
            self.services.circuits.configure(name, provider.circuit)
        self.budget.activate()


def _model_entries(settings: Settings) -> list[dict[str, object]]:
    """GET /v1/models' entries: the catalog, then the slots."""
    data: list[dict[str, object]] = []
    for ref, entry in settings.models.items():
        data.append(
            {
                "id": ref,
                "object": "model",
                "created": 0,
                "owned_by": entry.provider,
                "context_window": entry.context,
                "max_output_tokens": entry.max_output,
                "capabilities": sorted(entry.caps),
                "tags": sorted(entry.tags),
                "pricing": None
                if entry.price is None
                else {
                    "input_per_mtok": entry.price.input_per_mtok,
                    "output_per_mtok": entry.price.output_per_mtok,
                },
            }
        )
    for name, refs in settings.slots.items():
        data.append(
            {"id": f"slot:{name}", "object": "model", "created": 0, "owned_by": "ringside",
             "refs": list(refs)}
        )  # fmt: skip
    return data


class RuntimeHolder:
    """The current Runtime of a gateway, swapped atomically on reload."""

    def __init__(self, config_path: str, runtime: Runtime) -> None:
        self.config_path = config_path
        runtime.activate()
        self.current = runtime
        # price data fetched by prices.auto_update (sidecar/prices_update.py); None: the
        # installed package's snapshot
        self.price_data: PriceData | None = None

    def reload(self) -> bool:
        """Load the file again; a bad file is refused and the running config stays in force."""
        metrics = self.current.services.metrics
        try:
            settings = load_settings(self.config_path, price_data=self.price_data)
            runtime = Runtime(settings, self.current.services)
        except ConfigError as exc:
            metrics.config_reloads.labels("error").inc()
            log.error("config reload refused, keeping the running config:\n%s", exc)
            return False
        runtime.activate()
        self.current = runtime
        metrics.config_reloads.labels("success").inc()
        log.info("config reloaded from %s", self.config_path)
        return True
