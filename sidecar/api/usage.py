"""GET /v1/customers/{id}/usage on the admin listener: a customer's budget and usage.

Guarded by the admin token (`admin.token` in the config, else the `RINGSIDE_ADMIN_TOKEN`
environment variable, read at load), sent as `Authorization: Bearer <token>`. Without either
the endpoint is disabled: 403.
The window is the customer's current budget period (or `?period=day|month|total`, default
month, for a customer without a budget); `?since=` / `?until=` (ISO 8601 or Unix seconds)
narrow the usage part, never the budget figures.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from aiohttp import web

from sidecar.addons.budget import scope_of
from sidecar.api.common import bearer_matches, error_response
from sidecar.appkeys import STATE
from sidecar.errors import GatewayError, invalid_request
from sidecar.flow import CUSTOMER_PATTERN
from sidecar.settings.building import ADMIN_TOKEN_ENV
from sidecar.stores.budget import (
    PERIODS,
    StoreUnavailable,
    UsageRecord,
    iso_time,
    nano_to_usd,
    window,
)


def parse_time(text: str, param: str) -> float:
    """ISO 8601 (a date, or a date and time; UTC unless it says otherwise) or Unix seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise invalid_request(
            f"{param} must be an ISO 8601 time (2024-06-01 or 2024-06-01T12:00:00Z) or Unix "
            "seconds",
            param=param,
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def check_admin(request: web.Request) -> None:
    """Raises 403 while no admin token is configured, 401 unless the request carries it."""
    admin = request.app[STATE].settings.admin
    if admin.token is None:
        raise GatewayError(
            403,
            "admin_disabled",
            f"the usage endpoint is disabled: set admin.token in the config (or {ADMIN_TOKEN_ENV} "
            "in the sidecar's environment) and send it as 'Authorization: Bearer <token>'",
        )
    if not bearer_matches(request, admin.token):
        raise GatewayError(
            401,
            "invalid_api_key",
            f"send the admin token ({admin.token_source}) as 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": 'Bearer realm="ringside-admin"'},
        )


def summarize(records: list[UsageRecord]) -> dict[str, Any]:
    """Requests, tokens and cost, in total and per model used."""
    models: dict[str | None, list[int]] = {}
    prompt = completion = cost = errors = 0
    for record in records:
        prompt += record.prompt_tokens
        completion += record.completion_tokens
        cost += record.cost
        errors += record.status is not None and record.status >= 400
        row = models.setdefault(record.ref_used, [0, 0, 0, 0])
        row[0] += 1
        row[1] += record.prompt_tokens
        row[2] += record.completion_tokens
        row[3] += record.cost
    return {
        "requests": len(records),
        "errors": errors,
        "tokens": {"input": prompt, "output": completion, "total": prompt + completion},
        "cost_usd": nano_to_usd(cost),
        "models": [
            {
                "model": model,
                "requests": row[0],
                "tokens_in": row[1],
                "tokens_out": row[2],
                "cost_usd": nano_to_usd(row[3]),
            }
            for model, row in sorted(models.items(), key=lambda item: -item[1][3])
        ],
    }


async def customer_usage(request: web.Request) -> web.Response:
    try:
        return web.json_response(await _usage(request))
    except GatewayError as error:
        return error_response(error, {})


async def _usage(request: web.Request) -> dict[str, Any]:
    check_admin(request)
    state = request.app[STATE]
    if state.holder is None:
        raise GatewayError(503, "starting", "the sidecar is starting")
    customer = request.match_info["id"]
    if not CUSTOMER_PATTERN.match(customer):
        raise invalid_request("a customer id is 1-128 characters of A-Z a-z 0-9 _ . : -")
    runtime = state.runtime
    configured = runtime.settings.customers.get(customer)
    budget = configured.budget if configured is not None else None
    period = budget.period if budget is not None else request.query.get("period", "month")
    if period not in PERIODS:
        raise invalid_request("period must be day, month or total", param="period")
    win = window(period)
    since, until = win.start, win.end
    if "since" in request.query:
        since = parse_time(request.query["since"], "since")
    if "until" in request.query:
        until = parse_time(request.query["until"], "until")
    store = runtime.services.budgets
    scope = scope_of("cust", customer, budget) if budget is not None else None
    try:
        records = await store.usage(customer, since, until)
        balance = await store.balance(scope, win) if scope is not None else None
    except StoreUnavailable as exc:
        message = f"the usage store is unavailable: {exc}"
        raise GatewayError(503, "store_unavailable", message) from None
    body: dict[str, Any] = {
        "object": "customer.usage",
        "customer": customer,
        "period": period,
        "period_start": iso_time(win.start),
        "resets_at": iso_time(win.end),
        "since": iso_time(since),
        "until": iso_time(until),
        "limit_usd": None,
        "spent_usd": None,
        "reserved_usd": None,
        "remaining_usd": None,
    }
    if scope is not None and balance is not None:
        limit = scope.limit
        body.update(
            limit_usd=nano_to_usd(limit),
            spent_usd=nano_to_usd(balance.spent),
            reserved_usd=nano_to_usd(balance.held),
            remaining_usd=nano_to_usd(balance.remaining(limit)),
        )
    body.update(summarize(records))
    return body
