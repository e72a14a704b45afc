"""After the load, the books of a sidecar's store, read from its admin API."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from bench.targets import Target
from bench.workload import ADMIN_TOKEN, CUSTOMER


def ledger(target: Target) -> dict[str, Any]:
    """After the load: does the store's books balance? Read the bench customer's usage from
    the admin API once nothing is held any more (requests cut off at the end of a wrk run
    settle a moment later): every request the clients saw answered has its usage record, the
    budget's spent total is the sum of the records' costs, and no reservation is left held.
    The memory store keeps only its latest records, so only the last check applies to it."""
    assert target.admin_url is not None and target.store is not None
    request = urllib.request.Request(
        f"{target.admin_url}/v1/customers/{CUSTOMER}/usage",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(request, timeout=30) as reply:
            usage = json.loads(reply.read())
        if usage["reserved_usd"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    entry: dict[str, Any] = {
        "answered": target.answered,
        "cut": target.cut,
        "records": usage["requests"],
        "spent_usd": usage["spent_usd"],
        "records_cost_usd": usage["cost_usd"],
        "held_usd": usage["reserved_usd"],
    }
    held_none = usage["reserved_usd"] == 0
    if target.store == "memory":
        entry["exact"] = held_none
        entry["note"] = "memory store: only its latest usage records are kept"
        return entry
    records_match = target.answered <= usage["requests"] <= target.answered + target.cut
    spend_matches = abs(usage["spent_usd"] - usage["cost_usd"]) < 1e-9
    entry["exact"] = held_none and records_match and spend_matches
    return entry
