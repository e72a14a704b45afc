"""Hard budgets per customer and per API key: reserve the worst case, settle to the real cost.

Before each upstream attempt the attempt's worst-case cost (every prompt byte a token, the
full output cap produced) is held in every budget that applies, all or none; a budget that
cannot hold it refuses the request with 402. After the attempt the hold is settled to what
the attempt really cost. Concurrent requests, and sidecars sharing one store, therefore never
spend past a limit. A request with no budget makes no store call here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Mapping
from typing import Any

from sidecar.addons.metrics import Metrics, customer_label
from sidecar.addons.usage import note_charged, usage_id
from sidecar.api.validation import requested_max_output
from sidecar.errors import CandidateRefused, GatewayError, Outcome
from sidecar.flow import EMBEDDINGS, Attempt, Flow
from sidecar.outage import Outage
from sidecar.pricing import worst_case_cost
from sidecar.providers.base import Usage
from sidecar.settings.model import Budget, Settings
from sidecar.stores.budget import (
    NANO,
    Balance,
    BudgetExceeded,
    BudgetStore,
    Charge,
    Hold,
    ImmediateBudgetStore,
    RecordRef,
    Scope,
    StoreUnavailable,
    Window,
    carries_record,
    ceil_nano,
    iso_time,
    to_nano,
    usd_text,
    window,
)

log = logging.getLogger("ringside")


OVERRUN_LOG_SECONDS = 60.0
REPROMPT_SLACK = 8192  # bytes of validation errors a schema re-prompt may add


def prompt_bound(flow: Flow) -> int:
    """The most prompt tokens an attempt of this request can send: every request byte a token;
    with a response_format, also the schema instruction (at most the request again), and for
    re-prompts the earlier answers (their completion tokens) and the error lists."""
    bound = flow.body_bytes
    if flow.schema_plan is not None:
        bound += flow.body_bytes + REPROMPT_SLACK * flow.reprompts
        bound += sum(a.usage.completion_tokens for a in flow.attempts if a.usage is not None)
    return bound


def worst_case(flow: Flow, attempt: Attempt, cap: int) -> float:
    """USD an attempt can cost at most: the prompt bound, and `cap` output tokens per choice
    (the cap the attempt is sent with)."""
    cost = worst_case_cost(attempt.candidate, prompt_bound(flow), cap)
    choices = flow.body.get("n")
    if isinstance(choices, int) and choices > 1:
        cost += (choices - 1) * worst_case_cost(attempt.candidate, 0, cap)
    return cost


def scope_of(kind: str, ident: str, budget: Budget) -> Scope:
    return Scope(kind, ident, to_nano(budget.usd), budget.period)


def refusal(exc: BudgetExceeded) -> GatewayError:
    scope, balance, win = exc.scope, exc.balance, exc.window
    requests = balance.held - balance.leased
    held = f" (+${usd_text(requests)} held by requests in flight)" if requests else ""
    if balance.leased:  # room other sidecar processes set aside for their requests
        held += (
            f" (+${usd_text(balance.leased)} held by sidecar processes' budget leases: their "
            "requests in flight and room for the next ones, given back when they are idle)"
        )
    resets = (
        f"the budget resets at {iso_time(win.end)}"
        if win.end is not None
        else "the budget is a total and does not reset"
    )
    per = "in total" if scope.period == "total" else f"per {scope.period}"
    return GatewayError(
        402,
        "budget_exceeded",
        f"the budget of {scope.label} cannot cover this request: limit ${usd_text(scope.limit)} "
        f"{per}, spent ${usd_text(balance.spent)}{held}, this request may cost up to "
        f"${usd_text(exc.amount)}; {resets}. Lower max_tokens, pick a cheaper model, or raise "
        "the budget",
    )


class BudgetAddon:
    def __init__(
        self,
        settings: Settings,
        store: BudgetStore,
        metrics: Metrics,
        outage: Outage | None = None,  # kept across reloads (runtime.Services)
    ) -> None:
        self.settings = settings
        self.outage = outage or Outage("budget", metrics)
        self.store = store
        self.metrics = metrics
        self.ttl = settings.storage.reservation_ttl
        self.customers: Mapping[str, Scope] = {
            cid: scope_of("cust", cid, c.budget)
            for cid, c in settings.customers.items()
            if c.budget is not None
        }
        self.keys: Mapping[str, Scope] = {
            key.id: scope_of("key", key.id, key.budget)
            for key in settings.keys
            if key.budget is not None
        }
        self.active = bool(self.customers or self.keys)
        self._gauges: dict[str, tuple[Any, Any]] = {}  # customer → its spent, remaining gauges
        self._windows: dict[str, Window] = {}
        self._overrun_logged: dict[str, float] = {}  # provider → when its overrun was logged
        # a store that can often answer at once: the memory store always, redis on its leases
        self._now: ImmediateBudgetStore | None = (
            store if callable(getattr(store, "reserve_now", None)) else None  # type: ignore[assignment]
        )

    def activate(self) -> None:
        """Show this config's customer budgets in the gauges: run by runtime.Runtime.activate,
        once the config is accepted (building the addon for a refused one changes nothing)."""
        for cid, scope in self.customers.items():
            self.metrics.budget_limit.labels(cid).set(scope.limit / NANO)
            self._customer_gauges(cid)

    def _customer_gauges(self, cid: str) -> tuple[Any, Any]:
        found = self._gauges.get(cid)
        if found is None:
            found = self._gauges[cid] = (
                self.metrics.budget_spent.labels(cid),
                self.metrics.budget_remaining.labels(cid),
            )
        return found

    def window(self, period: str, now: float) -> Window:
        """The current period, computed once per period rather than per request."""
        found = self._windows.get(period)
        if found is None or (
            found.start is not None and found.end is not None and not found.start <= now < found.end
        ):
            found = self._windows[period] = window(period, now)
        return found

    def scopes(self, flow: Flow) -> list[Scope]:
        found = []
        principal = flow.principal
        if principal.customer is not None and principal.customer in self.customers:
            found.append(self.customers[principal.customer])
        if principal.key_id is not None and principal.key_id in self.keys:
            found.append(self.keys[principal.key_id])
        return found

    def routed(self, flow: Flow) -> None:
        if not self.active or flow.route is None:
            return
        scopes = self.scopes(flow)
        if not scopes:
            return
        flow.budget_scopes = scopes
        unpriced = [c.ref for c in flow.route.candidates if c.price is None]
        if unpriced:
            raise GatewayError(
                400,
                "invalid_request",
                f"{scopes[0].label} has a budget, and {', '.join(unpriced)} has no price (the "
                "price data does not know it): a budgeted request can use only priced models "
                "(add the model to `models` with its prices, or give its provider a "
                "default_price)",
                param="model",
            )

    def attempt(self, flow: Flow, attempt: Attempt) -> Awaitable[None] | None:
        scopes = flow.budget_scopes
        if not scopes:
            return None
        if flow.endpoint == EMBEDDINGS:
            cap = 0  # input tokens only (SPEC 2.6): nothing to cap
        else:
            # the upstream is sent the cap the hold covers, even when the client asked for none
            requested = requested_max_output(flow.body)
            cap = attempt.output_cap = attempt.candidate.output_cap(requested)
        amount = ceil_nano(worst_case(flow, attempt, cap))
        now = time.time()
        windows = [(scope, self.window(scope.period, now)) for scope in scopes]
        if self._now is None:
            return self._reserve(flow, attempt, windows, amount)
        try:  # nothing to wait for (see sidecar/pipeline.py)
            holds = self._now.reserve_now(windows, amount, self.ttl)
        except BudgetExceeded as exc:
            raise self._refused(flow, exc, scopes) from None
        if holds is None:  # a lease lacks room: the store's round trip
            return self._reserve(flow, attempt, windows, amount)
        self._held(flow, attempt, holds)
        return None

    async def _reserve(
        self, flow: Flow, attempt: Attempt, windows: list[tuple[Scope, Window]], amount: int
    ) -> None:
        try:
            holds = await self.store.reserve(windows, amount, self.ttl)
            if self.outage.down:
                self.outage.answered()
        except BudgetExceeded as exc:
            raise self._refused(flow, exc, flow.budget_scopes) from None
        except StoreUnavailable as exc:
            self.outage.failed("reserve", "budgeted requests refused with 503", exc)
            raise GatewayError(
                503,
                "store_unavailable",
                "the budget store cannot be reached, and this request is under a budget: "
                "retry shortly (storage.fail_open: true admits budgeted requests during a "
                "store outage)",
            ) from None
        self._held(flow, attempt, holds)

    def _refused(self, flow: Flow, exc: BudgetExceeded, scopes: list[Scope] | None) -> GatewayError:
        """The refusal of this candidate: a cascade goes on to the next one (402 when none is
        left; counted in `error`, once per request)."""
        self._show(flow, {exc.scope.name: exc.balance}, scopes)
        return CandidateRefused(refusal(exc), Outcome.BUDGET)

    def error(self, flow: Flow) -> None:
        if flow.error is not None and flow.error.code == "budget_exceeded":
            customer = customer_label(self.settings, flow.principal.customer)
            self.metrics.tally.inc(self.metrics.budget_exceeded.labels(customer))

    @staticmethod
    def _held(flow: Flow, attempt: Attempt, holds: list[Hold]) -> None:
        if flow.budget_holds is None:
            flow.budget_holds = {}
        flow.budget_holds[id(attempt)] = holds
        # the header as of now (a stream's headers leave before its settle); gauges at settle
        flow.budget_remaining_usd = max(0, min(h.scope.limit - h.spent for h in holds)) / NANO

    def attempt_done(self, flow: Flow, attempt: Attempt) -> Awaitable[None] | None:
        if attempt.candidate.price is None:
            flow.priced = False
        held = flow.budget_holds
        holds = held.pop(id(attempt), None) if held else None
        if holds is None:
            return None
        usage = attempt.usage or Usage()
        settles = flow.budget_settles = flow.budget_settles + 1
        record_id = usage_id(flow)
        cost = to_nano(attempt.cost_usd)
        charge = Charge(
            f"{record_id}:{settles}", cost, usage.prompt_tokens, usage.completion_tokens
        )
        record = RecordRef(record_id, flow.principal.customer, flow.started_wall)
        if cost > holds[0].amount:
            self._overrun(flow, attempt, cost - holds[0].amount)
        if carries_record(holds, record):
            note_charged(flow, cost, usage)  # before the await: a cancel must not re-add it
        settled = None if self._now is None else self._now.settle_now(holds, charge, record)
        if settled is None:
            return self._settle(flow, holds, charge, record)
        self._show(flow, settled.balances, flow.budget_scopes)
        return settled.wait  # a settle write the kernel has not taken yet: the answer waits

    def _overrun(self, flow: Flow, attempt: Attempt, beyond: int) -> None:
        """An upstream produced more than the cap it was sent: the whole cost is charged (the
        next reservation sees the real spend), and what went past the hold is counted."""
        customer = customer_label(self.settings, flow.principal.customer)
        self.metrics.tally.inc(self.metrics.budget_overrun.labels(customer), beyond / NANO)
        provider = attempt.candidate.provider.name
        now = time.monotonic()
        if now - self._overrun_logged.get(provider, -OVERRUN_LOG_SECONDS) >= OVERRUN_LOG_SECONDS:
            self._overrun_logged[provider] = now
            log.warning(
                "provider %s answered request %s beyond the %s-token cap it was sent: $%s "
                "charged past the budget hold (ringside_budget_overrun_usd_total; one line per "
                "provider per minute)",
                provider, flow.id, attempt.output_cap, usd_text(beyond),
            )  # fmt: skip

    async def _settle(
        self, flow: Flow, holds: list[Hold], charge: Charge, record: RecordRef
    ) -> None:
        try:
            settled = await self.store.settle(holds, charge, record)  # survives a cancel
        except Exception:
            log.exception("settling the budget of request %s failed", flow.id)
            return
        self._show(flow, settled.balances, flow.budget_scopes)

    def _show(
        self,
        flow: Flow,
        balances: Mapping[str, Balance],
        scopes: list[Scope] | None,
    ) -> None:
        """Gauges of customer budgets, and the remaining budget for the response header."""
        remaining: list[int] = []
        for scope in scopes or ():
            balance = balances.get(scope.name)
            if balance is None:
                continue
            left = balance.remaining(scope.limit)
            remaining.append(left)
            if scope.kind == "cust":
                gauges = self._gauges.get(scope.ident) or self._customer_gauges(scope.ident)
                self.metrics.tally.set(gauges[0], balance.spent / NANO)
                self.metrics.tally.set(gauges[1], left / NANO)
        if remaining:
            flow.budget_remaining_usd = min(remaining) / NANO

    async def refresh(self) -> None:
        """Set the spent and remaining gauges of every budgeted customer from the store."""
        now = time.time()
        for scope in self.customers.values():
            try:
                balance = await self.store.balance(scope, window(scope.period, now))
            except StoreUnavailable:
                return
            left = balance.remaining(scope.limit)
            spent_gauge, remaining_gauge = self._customer_gauges(scope.ident)
            self.metrics.tally.set(spent_gauge, balance.spent / NANO)
            self.metrics.tally.set(remaining_gauge, left / NANO)
