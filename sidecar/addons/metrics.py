"""Every Prometheus metric of SPEC 6, defined once, and the addon that keeps them current.

Each app gets its own CollectorRegistry (no process-global state), so two gateways can live
in one process and tests can read exact values. Labels are bounded: customers not named in
the config are `_other`; models are catalog/slot refs or `fc:<provider>/_other`.
"""

from __future__ import annotations

import os
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
EXHAUSTED_CODES = frozenset({"upstream_unavailable", "response_schema_validation_failed"})


def exposition(registry: CollectorRegistry) -> bytes:
    """The text to serve on /metrics: this registry, or all workers' when `--workers` > 1."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)
    return generate_latest(registry)


class Metrics:
    """The metric objects of one gateway, registered in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
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
        self.rate_limited = Counter(
            "ringside_rate_limited_total", "Requests refused with 429", ["scope"], registry=r
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


def customer_label(settings: Settings, customer: str | None) -> str:
    return customer if customer is not None and customer in settings.customers else OTHER


class MetricsAddon:
    """Records each request's metrics from its Flow; first in the chain so it sees every request.

    Labelled children are looked up once and kept (labels are bounded), which keeps
    prometheus-client's per-call label validation and locking off the hot path.
    """

    def __init__(self, metrics: Metrics, settings: Settings) -> None:
        self.metrics = metrics
        self.settings = settings
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        self._duration = {
            stream: metrics.request_duration.labels("true" if stream else "false")
            for stream in (True, False)
        }

    def child(self, metric: Any, *labels: str) -> Any:
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def request(self, flow: Flow) -> None:
        self.metrics.inflight.inc()
        flow.metadata["metrics_inflight"] = True

    def attempt_done(self, flow: Flow, attempt: Attempt) -> None:
        candidate = attempt.candidate
        provider, label = candidate.provider.name, candidate.label
        m = self.metrics
        self.child(m.upstream_requests, provider, label, attempt.outcome).inc()
        self.child(m.upstream_duration, provider).observe(attempt.seconds)
        usage = attempt.usage
        if usage is not None and (usage.prompt_tokens or usage.completion_tokens):
            self.child(m.tokens, provider, label, "prompt").inc(usage.prompt_tokens)
            self.child(m.tokens, provider, label, "completion").inc(usage.completion_tokens)
        if attempt.cost_usd:
            customer = customer_label(self.settings, flow.principal.customer)
            self.child(m.cost, customer, label).inc(attempt.cost_usd)

    def done(self, flow: Flow) -> None:
        m = self.metrics
        if flow.metadata.pop("metrics_inflight", False):
            m.inflight.dec()
        self.child(m.requests, str(flow.status)).inc()
        self._duration[flow.stream].observe(flow.seconds)
        m.overhead.observe(flow.overhead_seconds)
        if flow.models_tried:
            m.cascade_depth.observe(len(flow.models_tried))
        for from_model, to_model, reason in flow.fallbacks:
            self.child(m.fallbacks, from_model, to_model, reason).inc()
        for model, result in flow.schema_checks:
            self.child(m.schema_validations, model, result).inc()
        for model in flow.schema_reprompts:
            self.child(m.schema_reprompts, model).inc()
        error = flow.error
        if error is not None and flow.attempts and error.code in EXHAUSTED_CODES:
            self.child(m.cascade_exhausted, error.code).inc()
        if flow.first_token_at is not None and flow.attempts:
            provider = flow.attempts[-1].candidate.provider.name
            self.child(m.time_to_first_token, provider).observe(flow.first_token_at - flow.started)
