"""Rate limits (SPEC 4): requests and tokens per minute per client IP, key, developer, customer.

Scopes and who they count:
  ip        the client IP (`X-Forwarded-For` only from `trusted_proxies`, see addons/auth.py)
  token     the API key presented, or the key a client token was minted with (its key id)
  dev       the key's developer
  customer  the customer (a client token's, else FC-Customer)
Each scope takes `rate_limits.<scope>: {rpm, tpm}`; `keys[].rate_limit` replaces the `token`
limits of that key and `customers.<id>.rate_limit` those of that customer, field by field (a key
that sets only `rpm` keeps the default `tpm`). A missing value means no limit.

The check runs in the `request` hook, after auth and before idempotency, as one `acquire` of
every applicable cell (GCRA, see stores/ratelimit_base.py): one dict pass in process, one Lua
call with Redis. Tokens are charged at admission with an estimate — prompt bytes / 4 plus the
request's own `max_tokens`/`max_completion_tokens` (without one, the output is charged when it
is known) — capped at the limit itself so that a big request fits a full bucket, and settled to
the real usage when the request is done (a refund, or a debt that later requests wait out).

A refusal is `429 rate_limited` naming the scope in `X-Ringside-RateLimit-Scope`, with
`Retry-After` (seconds) and `retry-after-ms` (read by the OpenAI SDKs), and the
`x-ratelimit-*` headers of OpenAI; admitted answers carry the `x-ratelimit-*` headers too, for
the tightest limit of each kind.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Sequence

from sidecar.addons.metrics import Metrics
from sidecar.errors import GatewayError
from sidecar.flow import Flow
from sidecar.outage import Outage
from sidecar.settings.model import RateLimit, Settings
from sidecar.stores.ratelimit_base import REQUESTS, TOKENS, Cell, RateLimiter, Verdict
from sidecar.stores.ratelimit_memory import MemoryLimiter

SCOPES = ("ip", "token", "dev", "customer")
SCOPE_NOUNS = {"ip": "client IP", "token": "API key", "dev": "developer", "customer": "customer"}
MAX_PLANS = 10_000  # callers whose cells are kept built (forgotten all at once beyond this)


def merged(override: RateLimit | None, default: RateLimit | None) -> RateLimit | None:
    if override is None:
        return default
    if default is None:
        return override
    return RateLimit(
        rpm=override.rpm if override.rpm is not None else default.rpm,
        tpm=override.tpm if override.tpm is not None else default.tpm,
    )


def duration(seconds: float) -> str:
    """A wait as OpenAI writes it in x-ratelimit-reset-*: `120ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m" + (f"{rest:.3f}".rstrip("0").rstrip(".") or "0") + "s"


def tokens_estimate(flow: Flow) -> int:
    body = flow.body
    # chat's output cap, or a Responses API request's (this hook sees the client's body)
    requested = (
        body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
    )
    output = requested if isinstance(requested, int) and not isinstance(requested, bool) else 0
    return flow.body_bytes // 4 + max(0, output)


_HEADER_NAMES = {
    kind: (
        f"x-ratelimit-limit-{kind}",
        f"x-ratelimit-remaining-{kind}",
        f"x-ratelimit-reset-{kind}",
    )
    for kind in (REQUESTS, TOKENS)
}


def state_headers(cells: Sequence[Cell], verdict: Verdict) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the tightest cell of each kind."""
    tightest: dict[str, tuple[int, Cell, float]] = {}
    for cell, backlog in zip(cells, verdict.backlogs, strict=True):
        remaining = cell.remaining(backlog)
        found = tightest.get(cell.kind)
        if (
            found is None
            or remaining < found[0]
            or (remaining == found[0] and cell.limit < found[1].limit)
        ):
            tightest[cell.kind] = (remaining, cell, backlog)
    headers = {}
    for kind, (remaining, cell, backlog) in tightest.items():
        limit_name, remaining_name, reset_name = _HEADER_NAMES[kind]
        headers[limit_name] = cell.limit_text
        headers[remaining_name] = str(remaining)
        headers[reset_name] = duration(backlog)
    return headers


class RateLimits:
    """The addon; built per config load, the limiter's state outlives reloads."""

    def __init__(self, settings: Settings, limiter: RateLimiter, metrics: Metrics) -> None:
        self.limiter = limiter
        defaults = settings.rate_limits
        self.ip = defaults.get("ip")
        self.token = defaults.get("token")
        self.dev = defaults.get("dev")
        self.customer = defaults.get("customer")
        self.per_key: dict[str, RateLimit | None] = {
            key.id: merged(key.rate_limit, self.token) for key in settings.keys if key.rate_limit
        }
        self.per_customer: dict[str, RateLimit | None] = {
            customer.id: merged(customer.rate_limit, self.customer)
            for customer in settings.customers.values()
            if customer.rate_limit
        }
        self.active = any(
            limit is not None and (limit.rpm or limit.tpm)
            for limit in (
                self.ip,
                self.token,
                self.dev,
                self.customer,
                *self.per_key.values(),
                *self.per_customer.values(),
            )
        )
        self.refused = {scope: metrics.rate_limited.labels(scope) for scope in SCOPES}
        outage: Outage | None = getattr(limiter, "outage", None)  # a shared limiter's
        if outage is not None:
            outage.metrics = metrics
        self._in_process = limiter if isinstance(limiter, MemoryLimiter) else None
        self._plans: dict[tuple[str | None, ...], tuple[Cell | tuple[str, str, int], ...]] = {}

    def cells(self, flow: Flow) -> list[Cell]:
        principal = flow.principal
        who = (flow.client_ip or None, principal.key_id, principal.developer, principal.customer)
        plan = self._plans.get(who)
        if plan is None:
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            plan = self._plans[who] = self._plan(*who)
        estimate = -1
        cells: list[Cell] = []
        for entry in plan:
            if isinstance(entry, Cell):
                cells.append(entry)
                continue
            if estimate < 0:
                estimate = tokens_estimate(flow)
            key, scope, limit = entry
            cells.append(Cell(key, scope, TOKENS, limit, min(estimate, limit)))
        return cells

    def _plan(
        self, ip: str | None, key_id: str | None, developer: str | None, customer: str | None
    ) -> tuple[Cell | tuple[str, str, int], ...]:
        """The cells of one caller: request cells whole (their cost is always 1), token cells
        as (key, scope, limit) to be costed per request."""
        applicable = (
            ("ip", ip, self.ip),
            ("token", key_id, self.per_key.get(key_id, self.token) if key_id else None),
            ("dev", developer, self.dev),
            (
                "customer",
                customer,
                self.per_customer.get(customer, self.customer) if customer else None,
            ),
        )
        plan: list[Cell | tuple[str, str, int]] = []
        for scope, who, limit in applicable:
            if who is None or limit is None:
                continue
            if limit.rpm:
                plan.append(Cell(f"{scope}:r:{who}", scope, REQUESTS, limit.rpm, 1))
            if limit.tpm:
                plan.append((f"{scope}:t:{who}", scope, limit.tpm))
        return tuple(plan)

    def request(self, flow: Flow) -> Awaitable[None] | None:
        if not self.active:
            return None
        cells = self.cells(flow)
        if not cells:
            return None
        if self._in_process is not None:  # a dict lookup: nothing to wait for
            self._admit(flow, cells, self._in_process.check(cells))
            return None
        return self._acquire(flow, cells)

    async def _acquire(self, flow: Flow, cells: list[Cell]) -> None:
        self._admit(flow, cells, await self.limiter.acquire(cells))

    def _admit(self, flow: Flow, cells: list[Cell], verdict: Verdict) -> None:
        headers = state_headers(cells, verdict)
        if not verdict.admitted:
            raise self.refusal(cells[verdict.refused], verdict.wait, headers)
        flow.extra_headers.update(headers)
        charged = [(c.key, c.cost, c.interval) for c in cells if c.kind == TOKENS]
        if charged:
            flow.ratelimit_charged = charged

    def refusal(self, cell: Cell, wait: float, headers: dict[str, str]) -> GatewayError:
        self.refused[cell.scope].inc()
        who = cell.key.split(":", 2)[2]
        noun = SCOPE_NOUNS[cell.scope]
        if cell.kind == REQUESTS:
            what = f"{cell.limit} requests per minute per {noun} ({who})"
        else:
            what = (
                f"{cell.limit} tokens per minute per {noun} ({who}); this request counts "
                f"{int(cell.cost)} tokens (prompt bytes / 4 + max_tokens)"
            )
        return GatewayError(
            429,
            "rate_limited",
            f"rate limit reached: {what}. Retry in {wait:.2f}s",
            headers={
                **headers,
                "Retry-After": str(max(1, math.ceil(wait))),
                "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
                "X-Ringside-RateLimit-Scope": cell.scope,
            },
        )

    def done(self, flow: Flow) -> None:
        """Settle the token estimate to the tokens really used (0 when nothing was called),
        and count every upstream call past the first (a cascade's next candidate, a retry, a
        schema re-prompt) as one more request: one request must not buy many calls."""
        charged, flow.ratelimit_charged = flow.ratelimit_charged, None
        shifts: list[tuple[str, float]] = []
        if charged is not None:
            used = flow.usage.prompt_tokens + flow.usage.completion_tokens
            shifts = [
                (key, (used - cost) * interval) for key, cost, interval in charged if used != cost
            ]
        if len(flow.attempts) > 1 and self.active:
            extra_calls = len(flow.attempts) - 1
            shifts += [
                (cell.key, extra_calls * cell.interval)
                for cell in self.cells(flow)
                if cell.kind == REQUESTS
            ]
        if shifts:
            self.limiter.adjust(shifts)
