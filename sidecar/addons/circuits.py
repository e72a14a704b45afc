"""Circuit breakers per provider: skip a provider that keeps failing, probe it after a cooldown.

closed ──N consecutive escalating failures──▶ open ──cooldown──▶ half-open
half-open: one probe call at a time; success closes, failure opens again.
Only failures that are the provider's (Outcome.UNAVAILABLE) count; a bad request, a prompt too
long or a schema miss says nothing about the provider's health. State outlives config reloads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.addons.metrics import Metrics
from sidecar.errors import Outcome
from sidecar.flow import Attempt, Flow
from sidecar.settings.model import Circuit


@dataclass(slots=True)
class _Breaker:
    failures: int = 0
    opened_at: float | None = None
    probe_started: float | None = None


class CircuitBreakers:
    """Breaker state of every provider of one gateway (long-lived, survives reloads)."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.clock = clock
        self._breakers: dict[str, _Breaker] = {}
        self._settings: dict[str, Circuit] = {}

    def configure(self, provider: str, circuit: Circuit) -> None:
        self._settings[provider] = circuit

    def is_open(self, provider: str) -> bool:
        """True while calls to `provider` should be skipped."""
        breaker = self._breakers.get(provider)
        if breaker is None or breaker.opened_at is None:
            return False
        circuit = self._settings.get(provider, Circuit())
        now = self.clock()
        if now - breaker.opened_at < circuit.cooldown:
            return True
        # half-open: one probe at a time; a probe that never reported back expires
        return breaker.probe_started is not None and now - breaker.probe_started < circuit.cooldown

    def starting(self, provider: str) -> None:
        breaker = self._breakers.get(provider)
        if breaker is not None and breaker.opened_at is not None:
            breaker.probe_started = self.clock()

    def succeeded(self, provider: str) -> None:
        breaker = self._breakers.get(provider)
        if breaker is None:
            return
        if breaker.opened_at is not None:
            self.metrics.circuit_open.labels(provider).set(0)
        breaker.failures, breaker.opened_at, breaker.probe_started = 0, None, None

    def failed(self, provider: str) -> None:
        breaker = self._breakers.setdefault(provider, _Breaker())
        breaker.failures += 1
        circuit = self._settings.get(provider, Circuit())
        if breaker.opened_at is not None or breaker.failures >= circuit.failures:
            breaker.opened_at = self.clock()
            breaker.probe_started = None
            self.metrics.circuit_open.labels(provider).set(1)


class CircuitAddon:
    """Feeds every attempt's outcome to the breakers."""

    def __init__(self, breakers: CircuitBreakers) -> None:
        self.breakers = breakers

    def attempt(self, flow: Flow, attempt: Attempt) -> None:
        self.breakers.starting(attempt.candidate.provider.name)

    def attempt_done(self, flow: Flow, attempt: Attempt) -> None:
        provider = attempt.candidate.provider.name
        error = attempt.error
        if error is None:
            self.breakers.succeeded(provider)
        elif error.outcome is Outcome.UNAVAILABLE and error.reason != "cancelled":
            self.breakers.failed(provider)
        elif error.outcome is not Outcome.UNAVAILABLE:
            self.breakers.succeeded(provider)  # the provider answered; it is healthy
