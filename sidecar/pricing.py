"""What a request costs: its whole usage × the candidate's prices (`Price.usage_cost_usd`:
cache reads and writes, reasoning, long-context tiers), and the worst case of an attempt. The
prices were resolved at load (sidecar/prices.py): this is arithmetic only."""

from __future__ import annotations

from sidecar.providers.base import Usage
from sidecar.routing import Candidate


def usage_cost(candidate: Candidate, usage: Usage) -> float:
    price = candidate.price
    if price is None:
        return 0.0
    return price.usage_cost_usd(usage)


def worst_case_cost(candidate: Candidate, prompt_bytes: int, max_output: int | None) -> float:
    """Upper bound of one attempt: every prompt byte a token billed at the dearest input rate
    it can be (no cache discount; a cache write where that costs more), the full output cap
    produced at the dearest output rate, in the dearest tier the prompt can reach."""
    price = candidate.price
    if price is None:
        return 0.0
    return price.worst_cost_usd(prompt_bytes, candidate.output_cap(max_output))
