"""The Flow: everything one request carries through the pipeline, from arrival to the access log."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sidecar.providers.base import Usage

if TYPE_CHECKING:
    from aiohttp import web
    from multidict import CIMultiDictProxy

    from sidecar.addons.idempotency import HeldClaim
    from sidecar.api.body_memory import Reservation
    from sidecar.errors import GatewayError, UpstreamError
    from sidecar.json_size import Sizes
    from sidecar.responses_request import ResponsesCall
    from sidecar.routing import Candidate, Route
    from sidecar.schema_check import Primed
    from sidecar.stores.budget import Hold, Scope
    from sidecar.structured import SchemaPlan

# what a Flow asks of its providers (`Flow.endpoint`): a chat completion (also the Responses
# API translated onto chat), or embeddings
CHAT = "chat"
EMBEDDINGS = "embeddings"

# a customer id, wherever one comes in: the FC-Customer header, a client token's claim, the
# usage endpoint's path
CUSTOMER_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


@dataclass(slots=True, eq=False)
class Principal:
    """Who is calling: the key (or anonymous in open mode), its developer, the customer. Never
    changed once made (auth makes a new one), so one NOBODY serves every Flow before auth."""

    key_id: str | None = None
    developer: str | None = None
    customer: str | None = None
    allowed: tuple[str, ...] = ()
    token_allowed: tuple[str, ...] = ()  # a client token's own allowed refs, on top of the key's
    origin: str | None = None  # the Origin a client token is bound to (CORS answers name it)


NOBODY = Principal()


@dataclass(slots=True)
class Attempt:
    """One upstream call of one candidate (re-prompts of the same candidate are separate)."""

    candidate: Candidate
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0
    usage: Usage | None = None
    error: UpstreamError | None = None
    cost_usd: float = 0.0
    output_cap: int | None = None  # tokens an `attempt` hook lets it produce (the budget's cap)

    @property
    def outcome(self) -> str:
        return "success" if self.error is None else self.error.outcome.value


@dataclass(slots=True)
class Flow:
    id: str
    headers: CIMultiDictProxy[str]
    client_ip: str
    body: dict[str, Any]
    body_bytes: int
    endpoint: str = CHAT  # set by the endpoint that serves the request
    started: float = field(default_factory=time.perf_counter)
    started_wall: float = field(default_factory=time.time)
    stream: bool = False
    include_usage: bool = False
    principal: Principal = NOBODY
    route: Route | None = None
    models_tried: list[str] = field(default_factory=list)
    model_used: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    fallbacks: list[tuple[str, str, str]] = field(default_factory=list)  # from, to, reason
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    priced: bool = True
    reprompts: int = 0
    schema_enforced: bool = False
    schema_plan: SchemaPlan | None = None  # the compiled response_format, when it asks for JSON
    part_sizes: Sizes | None = None  # a large body's parts its checks serialize, measured in slices
    # a large body's long array (chat's messages, embeddings' input) checked in slices before
    # `prepare` (Endpoint.check_ahead), which then skips it
    checked_ahead: bool = False
    # a large body's share of limits.max_body_memory_bytes (sidecar/api/body_memory.py)
    body_memory: Reservation | None = None
    schema_primed: Primed | None = None  # its response_format, compiled before its checks
    # POST /v1/responses: the client's request for providers with the native Responses API
    # (`body` is its translation onto chat, what every other provider is sent)
    responses: ResponsesCall | None = None
    schema_checks: list[tuple[str, str]] = field(default_factory=list)  # model label, result
    schema_reprompts: list[str] = field(default_factory=list)  # model label of each re-prompt
    status: int = 200
    error: GatewayError | None = None
    response: web.StreamResponse | None = None  # set by an addon to short-circuit the chain
    answer: web.StreamResponse | None = None  # what the client was sent; set before `done`
    capture: list[bytes] | None = None  # an addon sets [] to get every streamed body write
    upstream_seconds: float = 0.0
    first_token_at: float | None = None
    finished: float | None = None
    prompt_tokens_estimate: int = 0  # request bytes / 4: context checks, usage not reported
    # what the built-in addons keep about this request (their own, or passed between them)
    metrics_inflight: bool = False  # counted in ringside_inflight_requests until `done`
    ratelimit_charged: list[tuple[str, float, float]] | None = None  # cell, tokens, interval
    idempotency_claim: HeldClaim | None = None  # the Idempotency-Key this request holds
    budget_scopes: list[Scope] | None = None  # the budgets that apply to the request
    budget_holds: dict[int, list[Hold]] | None = None  # id(attempt) → its holds
    budget_settles: int = 0  # attempts settled so far (each settle's op id)
    budget_remaining_usd: float | None = None  # X-Ringside-Budget-Remaining-USD
    usage_id: str | None = None  # the usage record's id (see addons/usage.py)
    usage_charged: tuple[int, int, int] = (0, 0, 0)  # nano, prompt, completion in the record
    # user addons' own: the core and the built-in addons never read it (typed fields above)
    metadata: dict[str, Any] = field(default_factory=dict)
    extra_headers: dict[str, str] = field(default_factory=dict)  # addons' headers for the answer
    path: str = ""  # the request's path, for the access log (which endpoint, which pass-through)

    @property
    def fallback_triggered(self) -> bool:
        return len(self.models_tried) > 1

    @property
    def seconds(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    @property
    def overhead_seconds(self) -> float:
        """Time spent inside the sidecar, upstream time excluded."""
        return max(0.0, self.seconds - self.upstream_seconds)
