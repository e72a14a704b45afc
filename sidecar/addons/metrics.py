"""Every Prometheus metric of SPEC 6, defined once, and the addon that keeps them current.

Each app gets its own CollectorRegistry (no process-global state), so two gateways can live
in one process and tests can read exact values. Labels are bounded: customers not named in
the config are `_other`; models are catalog/slot refs or `fc:<provider>/_other`.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from sidecar.flow import Attempt, Flow
from sidecar.settings.model import Settings

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
OVERHEAD_BUCKETS = (
    0.00005, 0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0015, 0.0025,
    0.005, 0.01, 0.025, 0.05, 0.1,
)  # fmt: skip
OTHER = "_other"
FLUSH_SECONDS = 1.0  # how far behind /metrics may be for a worker that did not serve the scrape
MAX_PENDING = 4096  # distinct pending series before a flush is forced
EXHAUSTED_CODES = frozenset(
    {"upstream_unavailable", "response_schema_validation_failed", "context_length_exceeded"}
)


def exposition(metrics: Metrics) -> bytes:
    """The text to serve on /metrics: this registry, or all workers' when `--workers` > 1."""
    metrics.tally.flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)
    return generate_latest(metrics.registry)


class Tally:
    """Per-request metric updates as plain dict arithmetic, handed to prometheus-client in bulk.

    prometheus-client locks and validates on every update (about 1 µs per counter increment,
    2 µs per histogram observation); a request makes a dozen. Here an update adds to a dict
    entry, and `flush` (before every scrape, and every FLUSH_SECONDS for the other workers'
    scrapes) applies the sums: one increment per counter series and per histogram bucket.
    """

    def __init__(self) -> None:
        self._added: dict[Any, float] = {}  # counter or gauge child → amount to add
        self._latest: dict[Any, float] = {}  # gauge child → value to set
        self._buckets: dict[Any, list[float]] = {}  # histogram child → [per-bucket counts, sum]

    def inc(self, child: Any, amount: float = 1.0) -> None:
        added = self._added
        added[child] = added.get(child, 0.0) + amount

    def set(self, child: Any, value: float) -> None:
        self._latest[child] = value

    def observe(self, child: Any, value: float) -> None:
        bounds = child._upper_bounds  # prometheus-client's own, +Inf last
        pending = self._buckets.get(child)
        if pending is None:
            if len(self._buckets) >= MAX_PENDING:
                self.flush()
            pending = self._buckets[child] = [0.0] * (len(bounds) + 1)
        pending[bisect_left(bounds, value)] += 1
        pending[-1] += value

    def flush(self) -> None:
        added, self._added = self._added, {}
        latest, self._latest = self._latest, {}
        buckets, self._buckets = self._buckets, {}
        for child, amount in added.items():
            child.inc(amount)
        for child, value in latest.items():
            child.set(value)
        for child, pending in buckets.items():
            # prometheus-client's own histogram fields (stable since 0.4; with _upper_bounds
            # above): the bucket values and the sum, which observe() itself updates
            for index, count in enumerate(pending[:-1]):
                if count:
                    child._buckets[index].inc(count)
            child._sum.inc(pending[-1])


async def flush_periodically(metrics: Metrics) -> None:
    """Keep the shared (multiprocess) values at most FLUSH_SECONDS behind, and the pending
    tally small between scrapes."""
    while True:
        await asyncio.sleep(FLUSH_SECONDS)
        metrics.tally.flush()


class Metrics:
    """The metric objects of one gateway, registered in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.tally = Tally()
        r = self.registry
        self.requests = Counter(
            "ringside_requests_total",
            "Chat requests answered, by HTTP status",
            ["code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "ringside_request_duration_seconds",
            "Whole request time as the client sees it",
            ["stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "ringside_overhead_seconds",
            "Time spent inside the sidecar, upstream time excluded",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.upstream_requests = Counter(
            "ringside_upstream_requests_total",
            "Upstream calls by outcome",
            ["provider", "model", "outcome"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "ringside_upstream_duration_seconds",
            "Upstream call time",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "ringside_time_to_first_token_seconds",
            "Time from request arrival to the first streamed chunk",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter(
            "ringside_fallbacks_total",
            "Cascade escalations from one model to the next",
            ["from_model", "to_model", "reason"],
            registry=r,
        )
        self.cascade_depth = Histogram(
            "ringside_cascade_depth",
            "Models tried per request that reached an upstream",
            buckets=(1, 2, 3, 4, 5, 8),
            registry=r,
        )
        self.cascade_exhausted = Counter(
            "ringside_cascade_exhausted_total",
            "Requests for which every candidate failed",
            ["reason"],
            registry=r,
        )
        self.schema_validations = Counter(
            "ringside_schema_validations_total",
            "Structured-output validations by result (valid|invalid)",
            ["model", "result"],
            registry=r,
        )
        self.schema_reprompts = Counter(
            "ringside_schema_reprompts_total",
            "Re-prompts sent after a schema validation failure",
            ["model"],
            registry=r,
        )
        self.tokens = Counter(
            "ringside_tokens_total",
            "Tokens by provider, model and kind (prompt|completion)",
            ["provider", "model", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "ringside_cost_usd_total", "Spend in USD", ["customer", "model"], registry=r
        )
        self.budget_limit = Gauge(
            "ringside_budget_limit_usd",
            "Budget of the period",
            ["customer"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.budget_spent = Gauge(
            "ringside_budget_spent_usd",
            "Spent in the period",
            ["customer"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.budget_remaining = Gauge(
            "ringside_budget_remaining_usd",
            "Left in the period",
            ["customer"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.budget_exceeded = Counter(
            "ringside_budget_exceeded_total", "Requests refused with 402", ["customer"], registry=r
        )
        self.budget_overrun = Counter(
            "ringside_budget_overrun_usd_total",
            "USD settled beyond the hold: an upstream produced more than the cap it was sent",
            ["customer"],
            registry=r,
        )
        self.rate_limited = Counter(
            "ringside_rate_limited_total", "Requests refused with 429", ["scope"], registry=r
        )
        self.store_unavailable = Counter(
            "ringside_store_unavailable_total",
            "Store calls that failed because the store was unavailable (sidecar/outage.py)",
            ["store", "operation"],
            registry=r,
        )
        self.addon_errors = Counter(
            "ringside_addon_errors_total",
            "Exceptions raised by an addon's hook (sidecar/pipeline.py); addon: module:Class",
            ["addon", "hook"],
            registry=r,
        )
        self.inflight = Gauge(
            "ringside_inflight_requests",
            "Chat requests in progress",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.circuit_open = Gauge(
            "ringside_provider_circuit_open",
            "1 while the provider's circuit breaker is open",
            ["provider"],
            registry=r,
            multiprocess_mode="max",
        )
        self.config_reloads = Counter(
            "ringside_config_reloads_total", "Configuration reloads", ["result"], registry=r
        )
        # connections of the two listeners (sidecar/server_limits.py); listener: api | admin
        self.open_connections = Gauge(
            "ringside_open_connections",
            "Client connections open, by listener",
            ["listener"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_refused = Counter(
            "ringside_connections_refused_total",
            "Connections answered 503 and closed at accept: the listener was at its cap",
            ["listener"],
            registry=r,
        )
        self.body_memory = Gauge(
            "ringside_body_memory_bytes",
            "Memory that request bodies from 64 KiB hold, raw and parsed (estimated), of "
            "limits.max_body_memory_bytes",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connection_timeouts = Counter(
            "ringside_connection_timeouts_total",
            "Connections closed because headers (phase=header) or a body (phase=body) "
            "did not arrive in time",
            ["listener", "phase"],
            registry=r,
        )


def customer_label(settings: Settings, customer: str | None) -> str:
    return customer if customer is not None and customer in settings.customers else OTHER


class MetricsAddon:
    """Records each request's metrics from its Flow; first in the chain so it sees every request.

    Labelled children are looked up once and kept (labels are bounded), and updates go through
    the Tally, which keeps prometheus-client's per-call validation and locking off the hot path.
    """

    def __init__(self, metrics: Metrics, settings: Settings) -> None:
        self.metrics = metrics
        self.tally = metrics.tally
        self.settings = settings
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        self._duration = {
            stream: metrics.request_duration.labels("true" if stream else "false")
            for stream in (True, False)
        }
        self._by_status: dict[int, Any] = {}  # HTTP status → its ringside_requests_total child
        # (provider, model label, outcome, customer label) → the children an attempt updates
        self._attempt_series: dict[tuple[str, str, str, str], list[Any]] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def request(self, flow: Flow) -> None:
        self.tally.inc(self.metrics.inflight)
        flow.metrics_inflight = True

    def attempt_done(self, flow: Flow, attempt: Attempt) -> None:
        candidate = attempt.candidate
        outcome = "success" if attempt.error is None else attempt.error.outcome.value
        customer = flow.principal.customer
        if customer is None or customer not in self.settings.customers:
            customer = OTHER
        provider, label = candidate.provider.name, candidate.label
        key = (provider, label, outcome, customer)
        series = self._attempt_series.get(key)
        if series is None:  # bounded: candidates × outcomes × configured customers
            series = self._attempt_series[key] = [
                self.child(self.metrics.upstream_requests, provider, label, outcome),
                self.child(self.metrics.upstream_duration, provider),
                None,  # the tokens and cost children: made on first use, so that a series
                None,  # appears in /metrics only once it has counted something
                None,
            ]  # fmt: skip
        tally = self.tally
        tally.inc(series[0])
        tally.observe(series[1], attempt.seconds)
        usage = attempt.usage
        if usage is not None and (usage.prompt_tokens or usage.completion_tokens):
            if series[2] is None:
                series[2] = self.child(self.metrics.tokens, provider, label, "prompt")
                series[3] = self.child(self.metrics.tokens, provider, label, "completion")
            tally.inc(series[2], usage.prompt_tokens)
            tally.inc(series[3], usage.completion_tokens)
        if attempt.cost_usd:
            if series[4] is None:
                series[4] = self.child(self.metrics.cost, customer, label)
            tally.inc(series[4], attempt.cost_usd)

    def done(self, flow: Flow) -> None:
        m, tally = self.metrics, self.tally
        if flow.metrics_inflight:
            flow.metrics_inflight = False
            tally.inc(m.inflight, -1.0)
        requests = self._by_status.get(flow.status)
        if requests is None:
            requests = self._by_status[flow.status] = m.requests.labels(str(flow.status))
        tally.inc(requests)
        seconds = flow.seconds
        tally.observe(self._duration[flow.stream], seconds)
        tally.observe(m.overhead, max(0.0, seconds - flow.upstream_seconds))
        if flow.models_tried:
            tally.observe(m.cascade_depth, len(flow.models_tried))
        for from_model, to_model, reason in flow.fallbacks:
            tally.inc(self.child(m.fallbacks, from_model, to_model, reason))
        for model, result in flow.schema_checks:
            tally.inc(self.child(m.schema_validations, model, result))
        for model in flow.schema_reprompts:
            tally.inc(self.child(m.schema_reprompts, model))
        error = flow.error
        if error is not None and flow.attempts and error.code in EXHAUSTED_CODES:
            tally.inc(self.child(m.cascade_exhausted, error.code))
        if flow.first_token_at is not None and flow.attempts:
            provider = flow.attempts[-1].candidate.provider.name
            tally.observe(
                self.child(m.time_to_first_token, provider), flow.first_token_at - flow.started
            )
