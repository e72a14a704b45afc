"""The metrics Tally, in process: what it hands prometheus-client must equal what
prometheus-client's own updates give (issue 18: the Tally writes prometheus-client's histogram
internals, `_upper_bounds`, `_buckets`, `_sum`; an upgrade that moves them must fail here, loudly,
not show wrong buckets on a dashboard)."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sidecar.addons import metrics as metrics_module
from sidecar.addons.metrics import Tally

BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def family(registry: CollectorRegistry) -> tuple[Counter, Gauge, Histogram]:
    return (
        Counter("t_requests_total", "requests", ["code"], registry=registry),
        Gauge("t_remaining", "remaining", ["customer"], registry=registry),
        Histogram("t_seconds", "seconds", ["stream"], buckets=BOUNDS, registry=registry),
    )


def test_a_tally_flush_equals_prometheus_clients_own_updates() -> None:
    tallied, direct = CollectorRegistry(), CollectorRegistry()
    t_counter, t_gauge, t_hist = family(tallied)
    d_counter, d_gauge, d_hist = family(direct)
    tally = Tally()
    rng = random.Random(7)
    # values on the bucket bounds themselves (le is inclusive), between them, past the last
    values = [*BOUNDS, 0.0, 3.0, 1e9, *(rng.uniform(0, 3) for _ in range(500))]
    for index, value in enumerate(values):
        code, stream = ("200", "false") if index % 3 else ("503", "true")
        tally.inc(t_counter.labels(code))
        d_counter.labels(code).inc()
        tally.inc(t_counter.labels(code), value)
        d_counter.labels(code).inc(value)
        tally.set(t_gauge.labels("acme"), value)
        d_gauge.labels("acme").set(value)
        tally.observe(t_hist.labels(stream), value)
        d_hist.labels(stream).observe(value)
        if index == 250:
            tally.flush()  # a flush in the middle: later updates add to what is there
    tally.flush()
    assert samples(tallied) == pytest.approx(samples(direct), rel=1e-12)


def samples(registry: CollectorRegistry) -> dict[str, float]:
    """Every sample of the exposition but the `_created` timestamps (when a child was made)."""
    found = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("#") or "_created{" in line:
            continue
        name, _, value = line.rpartition(" ")
        found[name] = float(value)
    assert found
    return found


def test_nothing_reaches_prometheus_client_before_a_flush() -> None:
    registry = CollectorRegistry()
    counter, _gauge, histogram = family(registry)
    tally = Tally()
    tally.inc(counter.labels("200"))
    tally.observe(histogram.labels("false"), 0.3)
    text = generate_latest(registry).decode()
    assert 't_requests_total{code="200"} 1.0' not in text
    assert 't_seconds_count{stream="false"} 0.0' in text
    tally.flush()
    text = generate_latest(registry).decode()
    assert 't_requests_total{code="200"} 1.0' in text
    assert 't_seconds_bucket{le="0.5",stream="false"} 1.0' in text
    assert 't_seconds_bucket{le="0.25",stream="false"} 0.0' in text
    tally.flush()  # a second flush adds nothing
    assert 't_requests_total{code="200"} 1.0' in generate_latest(registry).decode()


def test_pending_histograms_are_bounded() -> None:
    """Past MAX_PENDING histogram children the tally flushes before taking one more."""
    registry = CollectorRegistry()
    histogram = Histogram("t_many", "many", ["key"], buckets=BOUNDS, registry=registry)
    tally = Tally()
    count = metrics_module.MAX_PENDING + 5
    for index in range(count):
        tally.observe(histogram.labels(str(index)), 0.01)
    assert len(tally._buckets) <= metrics_module.MAX_PENDING
    tally.flush()
    text = generate_latest(registry).decode()
    assert text.count('le="0.01"') == count
    assert f't_many_count{{key="{count - 1}"}} 1.0' in text
