"""What a request costs: real usage × catalog prices, and the worst case of an attempt."""

from __future__ import annotations

from sidecar.providers.base import Usage
from sidecar.routing import Candidate


def usage_cost(candidate: Candidate, usage: Usage) -> float:
    if candidate.price is None:
        return 0.0
    return candidate.price.cost_usd(usage.prompt_tokens, usage.completion_tokens)


def worst_case_cost(candidate: Candidate, prompt_bytes: int, max_output: int | None) -> float:
    """Upper bound of one attempt: every prompt byte a token, the full output cap produced."""
    if candidate.price is None:
        return 0.0
    return candidate.price.cost_usd(prompt_bytes, candidate.output_cap(max_output))
