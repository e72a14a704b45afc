"""Budget leases: a process's slice of a (scope, window) budget, held as one hold in the shared
store and spent here, synchronously, request by request.

A lease is one hold in the shared store (`amount`, under a lease id): in redis (budget_redis)
or a row of the sqlite file (budget_sqlite); "redis" below stands for either. This process
admits a request on it when `amount - reserved` covers the request's worst case, all or nothing
across the request's scopes, with no round trip. A settle takes the request's cost (at most its
worst case, and at most what the lease holds) off `amount` here and, in the same atomic write
that adds the cost to spent and to the usage record, off the lease's hold there: both sides do
the same arithmetic in the same order (every call of a lease goes through one ordered
connection, budget_line, or the sqlite store's one group-commit queue), so spent + held in the
store always covers every admitted request.

A lease is used only before its `deadline`: its TTL in redis from the moment the call that
took or renewed it was written, less a margin (this process's monotonic clock; redis's expiry
starts later, when the call runs). Leases are renewed while used, given back when idle and at
close; a lease of a crashed process expires with its TTL, as a per-request hold does.

Slices: a lease grows by `slice` worst cases of the request that asked (or by what its
requests in flight and those waiting for it hold, if more), at most a `SHARE`th of what redis
has free (limit - spent - held), and only when that is at least `LEAST` worst cases. Otherwise
the scope is `lean` for a moment: the lease gives its unreserved room back at once, and the
scope's requests take per-request holds (the RESERVE script, as without leases). So near the
limit N processes strand at most what their leases' requests in flight hold, plus the room
those requests leave on settling until the next lean refusal gives it back; a 402 there says
what requests in flight hold and what leases hold. A lease never outlives its TTL in redis
unless renewed, so a crashed process strands its lease's rest for at most the TTL.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from sidecar.ids import new_id
from sidecar.stores.budget import Hold, Scope, Window

SHARE = 4  # a grant is at most this fraction (1/SHARE) of what redis has free
LEAST = 2  # worst cases: a smaller grant is not worth a lease, the request holds alone
LEAN_SECONDS = 1.0  # after a refused grant, a scope's requests hold alone this long
RENEW_FRACTION = 3  # a used lease is renewed once a third of its TTL has passed
MARGIN_FRACTION = 0.1  # local use stops this fraction of the TTL before redis could expire it
MARGIN_MAX = 5.0  # … but never more than this many seconds before


@dataclass(slots=True, eq=False)
class Lease:
    scope: Scope
    window: Window
    id: str = field(default_factory=lambda: "L" + new_id())
    amount: int = 0  # what redis holds for it (as this process wrote it)
    reserved: int = 0  # worst cases of the requests admitted on it, not settled yet
    in_flight: int = 0
    deadline: float = 0.0  # monotonic: no admission from then on
    renewed: float = 0.0  # monotonic: when the last take or renewal was written
    used: float = 0.0  # monotonic: the last admission or settle
    created: bool = False  # redis answered the call that created it
    ended: bool = False  # given back, gone, or abandoned: no admission
    growing: asyncio.Future[Any] | None = None  # the call under way, shared by its waiters

    @property
    def free(self) -> int:
        return self.amount - self.reserved


def margin(ttl: float) -> float:
    return min(ttl * MARGIN_FRACTION, MARGIN_MAX)


class LeaseBook:
    """This process's leases by (scope, window), and the scopes that are lean."""

    __slots__ = ("lean", "leases", "slice", "ttl", "waiting")

    def __init__(self, ttl: float, slice_requests: int) -> None:
        self.leases: dict[tuple[str, str], Lease] = {}
        self.lean: dict[tuple[str, str], float] = {}  # scope, window → lean until (monotonic)
        self.waiting: dict[tuple[str, str], int] = {}  # worst cases of requests awaiting room
        self.ttl = ttl
        self.slice = slice_requests

    def admit(self, windows: list[tuple[Scope, Window]], amount: int) -> list[Hold] | None:
        """Holds on every scope's lease, or None (some lease lacks room: no change)."""
        now = time.monotonic()
        leases = self.leases
        found: list[Lease] = []
        for scope, win in windows:
            lease = leases.get((scope.name, win.id))
            if (
                lease is None
                or lease.ended
                or lease.deadline <= now
                or lease.free < amount
                or lease.scope.limit != scope.limit  # a reload changed it: not on this lease
            ):
                return None
            found.append(lease)
        holds = []
        for lease in found:
            lease.reserved += amount
            lease.in_flight += 1
            lease.used = now
            holds.append(Hold(lease.id, lease.scope, lease.window, amount, lease=lease))
        return holds

    @staticmethod
    def unadmit(hold: Hold) -> None:
        """A lease hold given up before its attempt (a refusal on another scope, a cancel)."""
        lease = hold.lease
        assert isinstance(lease, Lease)
        lease.reserved -= hold.amount
        lease.in_flight -= 1

    @staticmethod
    def settle(hold: Hold, cost: int) -> int:
        """What the settle takes off the lease (here now, in redis with the settle's write)."""
        lease = hold.lease
        assert isinstance(lease, Lease)
        take = min(cost, hold.amount, lease.amount) if not lease.ended else 0
        lease.amount -= take
        lease.reserved -= hold.amount
        lease.in_flight -= 1
        lease.used = time.monotonic()
        return take

    def is_lean(self, key: tuple[str, str], now: float) -> bool:
        until = self.lean.get(key)
        if until is None:
            return False
        if until <= now:
            del self.lean[key]
            return False
        return True

    def want(self, lease: Lease, amount: int) -> tuple[int, int]:
        """A grant's size for a request of `amount`: (at most, at least). At most `slice`
        worst cases, or what the lease's requests in flight and those waiting for it hold, if
        more: a lease keeps up with a burst, or a process's concurrency, in a grant or two."""
        key = (lease.scope.name, lease.window.id)
        demand = lease.reserved + self.waiting.get(key, amount)
        return max(self.slice * amount, demand), LEAST * amount

    def wait(self, windows: list[tuple[Scope, Window]], amount: int, sign: int) -> None:
        """Count (sign 1) or uncount (-1) a request that waits for room on these leases."""
        waiting = self.waiting
        for scope, win in windows:
            key = (scope.name, win.id)
            left = waiting.get(key, 0) + sign * amount
            if left:
                waiting[key] = left
            else:
                del waiting[key]
