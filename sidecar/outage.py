"""A store outage in the log: one line when the store stops answering, one when it answers again.

While a store is down every request may meet the failure, and a warning each buries the log
(a probe saw 33,729 lines in 10 s). An Outage logs the changes of state instead: the first
error, then how long the outage lasted and what it cost; each failure is counted in
`ringside_store_unavailable_total{store,operation}`. A caller reports each failure with
`failed` and, on its success path, calls `answered` only when `down` is set (an attribute
read per request).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.addons.metrics import Metrics

log = logging.getLogger("ringside")


class Outage:
    def __init__(self, store: str, metrics: Metrics | None = None) -> None:
        self.store = store  # a label value: budget | ratelimit | idempotency
        self.metrics = metrics
        self.down = False
        self._since = 0.0
        self._effects: dict[str, int] = {}  # what the failures did → how many, this outage
        self._counters: dict[str, Any] = {}  # operation → its counter child

    def failed(self, operation: str, effect: str, error: object) -> None:
        """One call met the store down. `operation` is a fixed word (a metric label); `effect`
        says what the failure does, in the plural ("budgeted requests refused with 503")."""
        if not self.down:
            self.down = True
            self._since = time.monotonic()
            self._effects = {}
            log.warning(
                "%s store unavailable: %s; %s until it answers again (logged once per outage; "
                "failures are counted in ringside_store_unavailable_total)",
                self.store, error, effect,
            )  # fmt: skip
        self._effects[effect] = self._effects.get(effect, 0) + 1
        if self.metrics is not None:
            counter = self._counters.get(operation)
            if counter is None:
                counter = self._counters[operation] = self.metrics.store_unavailable.labels(
                    self.store, operation
                )
            self.metrics.tally.inc(counter)

    def answered(self) -> None:
        """The store answered: ends the outage, if there is one."""
        if not self.down:
            return
        self.down = False
        cost = ", ".join(f"{count} {effect}" for effect, count in self._effects.items())
        log.warning(
            "%s store answers again after %.1fs unavailable; meanwhile %s",
            self.store, time.monotonic() - self._since, cost,
        )  # fmt: skip
