"""Budgets and usage records: the store protocol the memory, sqlite and redis backends implement.

Money is integer nano-USD (1 USD = 10**9) everywhere below the addon, so sums never drift.
A request's budget life: `reserve` the attempt's worst case against every scope that applies
(all or nothing), `settle` each attempt to its real cost (releasing the hold, adding to the
period's spent and to the request's usage record in one atomic write), then `write_usage` the
finished record. Every write that adds money carries an `op_id` so that a backend that may
replay it (the redis journal) applies it at most once.
"""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.stores.base import StoreUnavailable as StoreUnavailable  # re-exported

NANO = 1_000_000_000
PERIODS = ("day", "month", "total")


def to_nano(usd: float) -> int:
    return round(usd * NANO)


def ceil_nano(usd: float) -> int:
    """An upper bound in nano-USD (for reservations: never round a worst case down)."""
    return math.ceil(round(usd * NANO, 3))


def nano_to_usd(nano: int) -> float:
    return nano / NANO


def usd_text(nano: int) -> str:
    """Exact decimal text of a nano-USD amount: 123456789 → '0.123456789'."""
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO)
    text = f"{frac:09d}".rstrip("0")
    return f"{sign}{whole}.{text or '0'}"


@dataclass(frozen=True, slots=True)
class Window:
    """One budget period: its id in the store and its UTC bounds (None for `total`)."""

    period: str
    id: str
    start: float | None
    end: float | None


def window(period: str, now: float | None = None) -> Window:
    """The period containing `now` (UTC calendar days and months)."""
    now = time.time() if now is None else now
    if period == "total":
        return Window("total", "total", None, None)
    day = dt.datetime.fromtimestamp(now, dt.UTC).date()
    if period == "day":
        start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
        return Window("day", "d" + day.isoformat(), start.timestamp(), start.timestamp() + 86400)
    start = dt.datetime(day.year, day.month, 1, tzinfo=dt.UTC)
    days = calendar.monthrange(day.year, day.month)[1]
    return Window(
        "month",
        f"m{day.year:04d}-{day.month:02d}",
        start.timestamp(),
        start.timestamp() + days * 86400,
    )


def iso_time(ts: float | None) -> str | None:
    if ts is None:
        return None
    moment = dt.datetime.fromtimestamp(ts, dt.UTC)
    text = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return text.replace(".000Z", "Z")


@dataclass(frozen=True, slots=True)
class Scope:
    """A budget: a customer's (`cust:<id>`) or an API key's (`key:<id>`), in nano-USD."""

    kind: str  # "cust" | "key"
    ident: str
    limit: int
    period: str
    name: str = field(init=False)  # `cust:<id>`: the store's key, built once

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", f"{self.kind}:{self.ident}")

    @property
    def label(self) -> str:
        return ("customer " if self.kind == "cust" else "API key ") + repr(self.ident)


@dataclass(slots=True)  # made per request: a frozen init costs a call per field
class Hold:
    """A granted reservation of one scope; `local` when taken while the shared store was down."""

    id: str
    scope: Scope
    window: Window
    amount: int
    spent: int = 0  # the scope's spent in the window when the hold was taken
    local: bool = False
    lease: Any = None  # admitted on this process's lease (budget_lease.Lease), not held alone


@dataclass(slots=True)  # made per request: a frozen init costs a call per field
class Balance:
    spent: int
    held: int = 0
    leased: int = 0  # the part of `held` that sidecar processes' leases hold (budget_lease)

    def remaining(self, limit: int) -> int:
        return max(0, limit - self.spent)


@dataclass(slots=True)  # made per request: a frozen init costs a call per field
class Charge:
    """Money and tokens added to a request's usage record (and, in a settle, to spent)."""

    op_id: str  # unique per write: `<usage id>:<attempt #>` or `<usage id>:final`
    cost: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)  # made per request: a frozen init costs a call per field
class RecordRef:
    """Where a settle adds its charge: the request's usage record (created if absent)."""

    id: str
    customer: str | None
    time: float


@dataclass(slots=True)
class UsageRecord:
    """One request, as SPEC 4 lists it. `cost` in nano-USD."""

    id: str
    time: float
    request_id: str = ""
    key_id: str | None = None
    developer: str | None = None
    customer: str | None = None
    refs_tried: tuple[str, ...] = ()
    ref_used: str | None = None
    status: int | None = None  # None: the sidecar stopped before the request finished
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: int = 0
    latency_ms: float | None = None
    fallback: bool = False
    reprompts: int = 0

    def public(self) -> dict[str, Any]:
        """The exported shape (JSONL keys; CSV columns in this order)."""
        return {
            "time": iso_time(self.time),
            "request_id": self.request_id,
            "key_id": self.key_id,
            "dev": self.developer,
            "customer": self.customer,
            "refs_tried": list(self.refs_tried),
            "ref_used": self.ref_used,
            "status": self.status,
            "tokens_in": self.prompt_tokens,
            "tokens_out": self.completion_tokens,
            "cost_usd": nano_to_usd(self.cost),
            "latency_ms": self.latency_ms,
            "fallback": self.fallback,
            "reprompts": self.reprompts,
        }


@dataclass(slots=True)
class Finished:
    """A finished request's record plus the part of its cost no settle has recorded yet."""

    record: UsageRecord
    charge: Charge


class BudgetExceeded(Exception):
    """The scope cannot cover `amount` on top of what is spent and held."""

    def __init__(self, scope: Scope, win: Window, balance: Balance, amount: int) -> None:
        super().__init__(scope.name)
        self.scope = scope
        self.window = win
        self.balance = balance
        self.amount = amount


@dataclass(slots=True)
class Settled:
    """Each settled scope's balance after the settle, by scope name (its `held` may be left
    at 0: only the spent amount is read from it). `wait`: what must finish before the answer
    leaves (a settle written but not yet all taken by the kernel), or None."""

    balances: dict[str, Balance] = field(default_factory=dict)
    wait: Awaitable[None] | None = None


def carries_record(holds: Sequence[Hold], record: RecordRef) -> bool:
    """Whether a settle of `holds` adds its charge to the usage record: only the settle of the
    record's own customer budget does, in the same atomic write as that customer's spent (a key
    budget lives elsewhere, e.g. in another redis slot); other charges reach the record when
    the request finishes."""
    customer = record.customer
    if customer is not None:
        for hold in holds:
            if hold.scope.ident == customer and hold.scope.kind == "cust":
                return True
    return False


class BudgetStore(Protocol):
    """Budget holds, spent per period, and usage records: one backend behind all of them."""

    async def reserve(
        self, scopes: Sequence[tuple[Scope, Window]], amount: int, ttl: float
    ) -> list[Hold]:
        """Hold `amount` in every scope, or in none: raises BudgetExceeded / StoreUnavailable.
        A caller cancelled while the reserve is under way (a client that went away) leaves
        nothing held: what the reserve takes is released once it completes."""
        ...

    async def settle(self, holds: Sequence[Hold], charge: Charge, record: RecordRef) -> Settled:
        """Release the holds, add `charge.cost` to each scope's spent and, when
        `carries_record`, to the usage record, atomically. A backend that can lose its
        connection keeps the write and applies it later (the redis journal). The settle
        completes even when the caller is cancelled (a client that went away)."""
        ...

    async def write_usage(self, finished: Sequence[Finished]) -> None:
        """Finish records (fields set, the charge added); may run in the background."""
        ...

    async def balance(self, scope: Scope, win: Window) -> Balance: ...

    async def usage(
        self, customer: str | None, since: float | None, until: float | None
    ) -> list[UsageRecord]:
        """Records ordered by time; `customer=None` means every customer (and none)."""
        ...

    async def close(self) -> None: ...


class ImmediateBudgetStore(BudgetStore, Protocol):
    """A store that can often answer without awaiting: the budget addon tries these first."""

    def reserve_now(
        self, scopes: Sequence[tuple[Scope, Window]], amount: int, ttl: float
    ) -> list[Hold] | None:
        """`reserve` at once, or None when it needs I/O (then call `reserve`)."""
        ...

    def settle_now(
        self, holds: Sequence[Hold], charge: Charge, record: RecordRef
    ) -> Settled | None:
        """`settle` at once (its write on its way), or None when it needs I/O (call `settle`)."""
        ...


class AbandonedReserves:
    """A store's reserves whose caller was cancelled, and the releases they lead to.

    A reserve already queued or sent is not stopped by a cancel (the store applies it all the
    same), so a cancelled caller must not drop its holds: they would stay held until their TTL,
    counted against the budget for minutes. The store that owns one of these awaits its
    reserves through `reserve_or_release`; the release tasks are kept here until done (the
    event loop holds only weak references to tasks)."""

    __slots__ = ("releasing",)

    def __init__(self) -> None:
        self.releasing: set[asyncio.Task[None]] = set()

    async def reserve_or_release(
        self,
        reserving: asyncio.Future[list[Hold]],
        release: Callable[[list[Hold]], Awaitable[None]],
    ) -> list[Hold]:
        """Await a reserve that is already queued or sent; on a cancel its holds are released
        as soon as it completes."""
        try:
            return await asyncio.shield(reserving)
        except asyncio.CancelledError:
            reserving.add_done_callback(lambda done: self._release(done, release))
            raise

    def _release(
        self,
        reserving: asyncio.Future[list[Hold]],
        release: Callable[[list[Hold]], Awaitable[None]],
    ) -> None:
        if reserving.cancelled() or reserving.exception() is not None:
            return  # nothing was held (refused, or the store failed)
        task = asyncio.ensure_future(release(reserving.result()))
        self.releasing.add(task)
        task.add_done_callback(self.releasing.discard)
