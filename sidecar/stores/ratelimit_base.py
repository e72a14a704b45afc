"""Rate limiting as GCRA cells (SPEC 4): what every limiter backend offers.

A cell is one counter of one scope — e.g. the requests per minute of key `app1`. A limit of N
per minute admits N at once and refills continuously: each unit (a request, a token) moves the
cell's theoretical arrival time (TAT) on by `interval = 60 s / N`, and a charge is admitted
while the TAT stays within one period (60 s) of now. A charge that does not fit is refused as a
whole and changes nothing; `acquire` checks all of a request's cells at once and charges them
only if every one admits (so a request refused by one scope costs nothing in the others).

Rounding: a charge is admitted up to TOLERANCE (1 ms, or half an interval when that is shorter)
early, so that floating-point time never refuses the N-th request of a burst; that is far less
than one unit, so never more than N are admitted at once, nor more than the rate over time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

PERIOD = 60.0  # seconds: every limit is "per minute"
TOLERANCE = 0.001  # seconds
REQUESTS = "requests"
TOKENS = "tokens"


class Cell:
    """One counter to charge: `cost` units against `limit` per minute.

    A plain slotted class (a few are built per request): `interval` and `slack` (the rounding
    tolerance) are computed once here, for the backends and the headers."""

    __slots__ = ("cost", "interval", "key", "kind", "limit", "limit_text", "scope", "slack")

    def __init__(self, key: str, scope: str, kind: str, limit: int, cost: float) -> None:
        self.key = key  # stable identity across requests and replicas: scope, kind, who
        self.scope = scope  # ip | token | dev | customer
        self.kind = kind  # requests | tokens
        self.limit = limit
        self.limit_text = str(limit)  # for the x-ratelimit-limit-* header
        self.cost = cost
        interval = self.interval = PERIOD / limit
        self.slack = interval / 2 if interval < 2 * TOLERANCE else TOLERANCE

    def remaining(self, backlog: float) -> int:
        """Units still admissible at once when the cell's TAT is `backlog` seconds ahead."""
        free = int((PERIOD + self.slack - backlog) / self.interval)
        return 0 if free < 0 else free if free < self.limit else self.limit

    def __repr__(self) -> str:
        return f"Cell({self.key!r}, limit={self.limit}, cost={self.cost})"


@dataclass(slots=True)
class Verdict:
    """The outcome of `acquire`: admitted or not, and each cell's state after it.

    `backlogs[i]` is how far cell i's TAT is ahead of now, in seconds (0 when the cell is
    full); when refused, `refused` is the index of the cell with the longest `wait`, the
    seconds until the whole charge would fit."""

    admitted: bool
    backlogs: Sequence[float]
    refused: int = -1
    wait: float = 0.0


def decide(cells: Sequence[Cell], tats: Sequence[float | None], now: float) -> Verdict:
    """GCRA over a request's cells, given each cell's TAT (None: never seen or full): admit
    all or none. When admitted, cell i's new TAT is `now + verdict.backlogs[i]`."""
    news: list[float] = []
    refused, worst = -1, 0.0
    for index, cell in enumerate(cells):
        tat = tats[index]
        if tat is None or tat < now:
            tat = now
        new = tat + cell.cost * cell.interval
        over = new - now - PERIOD - cell.slack
        if over > worst:
            refused, worst = index, over
        news.append(new)
    if refused >= 0:
        backlogs = [0.0 if tat is None or tat < now else tat - now for tat in tats]
        return Verdict(False, backlogs, refused, worst)
    return Verdict(True, [new - now for new in news])


class RateLimiter(Protocol):
    async def acquire(self, cells: Sequence[Cell]) -> Verdict:
        """Check every cell; charge all of them, or none when any refuses."""
        ...

    def adjust(self, shifts: Sequence[tuple[str, float]]) -> None:
        """Move cells' TATs by seconds (positive: charge more; negative: refund, never
        below a full cell). Settling a token estimate to real usage; may run in the
        background (no result, never raises)."""
        ...

    async def close(self) -> None: ...
