"""Runs a Route: candidates in order, escalating only on errors whose Outcome says so.

The one place that decides escalation (SPEC 2.2). Each upstream call is an Attempt that the
pipeline's `attempt` / `attempt_done` hooks see, so budgets and metrics wrap every call,
re-prompts and streams included.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast

import orjson

from sidecar import sse
from sidecar.api.validation import requested_max_output
from sidecar.errors import CandidateRefused, GatewayError, Outcome, UpstreamError, kept
from sidecar.flow import EMBEDDINGS, Attempt, Flow
from sidecar.pipeline import Pipeline
from sidecar.pricing import usage_cost
from sidecar.providers.base import (
    ChunkStream,
    Completion,
    ProviderClient,
    ResponsesClient,
    UpstreamCall,
    Usage,
)
from sidecar.routing import Candidate
from sidecar.settings.model import ProviderSettings, Rewrite
from sidecar.structured import enforce

T = TypeVar("T")


def _apply_rewrites(
    body: dict[str, Any], rules: list[Rewrite]
) -> tuple[dict[str, Any], dict[str, str]]:
    body = dict(body)
    headers: dict[str, str] = {}
    for rule in rules:
        for name in rule.drop:
            body.pop(name, None)
        body.update(rule.set)
        for name, cap in rule.cap.items():
            value = body.get(name)
            if not isinstance(value, int | float) or value > cap:
                body[name] = int(cap) if float(cap).is_integer() else cap
        headers.update(rule.headers)
    return body, headers


OUTPUT_CAP_PARAMS = ("max_completion_tokens", "max_tokens")
RESPONSES_CAP_PARAMS = ("max_output_tokens",)  # a Responses API request's, sent natively


def with_output_cap(
    body: dict[str, Any], cap: int, names: tuple[str, ...] = OUTPUT_CAP_PARAMS
) -> dict[str, Any]:
    """`body` asking for at most `cap` output tokens per choice: the client's own parameter
    lowered to the cap when over it, else `max_completion_tokens` added (OpenAI's name; each
    adapter sends it in its provider's own parameter; `names[0]` for another request shape)."""
    capped, asked_for = body, False
    for name in names:
        asked = body.get(name)
        if isinstance(asked, int) and not isinstance(asked, bool):
            asked_for = True
            if asked > cap:
                if capped is body:
                    capped = dict(body)
                capped[name] = cap
    return capped if asked_for else {**body, names[0]: cap}


def retry_delay(provider: ProviderSettings, tries: int, error: UpstreamError) -> float | None:
    """Seconds to wait before trying the same candidate again, or None to move on.

    Only transient failures are retried (not a rejected provider key, a too-long prompt or a
    schema miss). Exponential backoff with equal jitter; an upstream `Retry-After` is honoured
    up to `retry_after_cap` — a provider asking for a longer pause is escalated from instead.
    """
    if tries >= provider.retries or error.outcome is not Outcome.UNAVAILABLE:
        return None
    if error.status in (401, 403) or error.reason == "cancelled":
        return None
    if error.retry_after is not None:
        return error.retry_after if error.retry_after <= provider.retry_after_cap else None
    backoff = provider.retry_backoff * (2**tries)
    return backoff / 2 + random.uniform(0, backoff / 2)


def exhausted(
    failures: list[tuple[Candidate, UpstreamError]], skipped_open: list[str]
) -> GatewayError:
    """The error when no candidate answered (SPEC 2.2): 422 if every failure was the schema's,
    400 context_length_exceeded if every candidate was too small for the prompt, 402 if none
    that could hold the prompt fits the budget, else 503 with the retry hint for SDKs."""
    outcomes = {e.outcome for _, e in failures}
    if outcomes == {Outcome.SCHEMA_FAILURE}:
        detail = "; ".join(f"{c.ref}: {e.message}" for c, e in failures)
        return GatewayError(
            422,
            "response_schema_validation_failed",
            f"no model produced output matching response_format: {detail}",
            param="response_format",
        )
    if outcomes and not skipped_open and outcomes <= {Outcome.CONTEXT_LENGTH, Outcome.BUDGET}:
        return _no_fit(failures, Outcome.BUDGET in outcomes)
    if Outcome.UNSUPPORTED in outcomes and not skipped_open and outcomes <= _REFUSALS:
        return _unsupported(failures)
    parts = [f"{c.ref}: {e.message}" for c, e in failures]
    parts.extend(f"{ref}: skipped, provider circuit open" for ref in skipped_open)
    count = len(failures) + len(skipped_open)
    lead = "the upstream provider failed" if count == 1 else f"all {count} candidate models failed"
    return GatewayError(
        503,
        "upstream_unavailable",
        f"{lead}: " + "; ".join(parts),
        headers=retry_hint(failures),
    )


def _no_fit(failures: list[tuple[Candidate, UpstreamError]], budget: bool) -> GatewayError:
    """Every candidate skipped or refused: for the budget (402) or for the prompt's size."""
    if budget:
        refusals = [e.client_error for _, e in failures if e.outcome is Outcome.BUDGET]
        if len(failures) == 1 and refusals[0] is not None:
            return refusals[0]  # one candidate: its refusal as it is
        detail = "; ".join(f"{c.ref}: {e.message}" for c, e in failures)
        return GatewayError(402, "budget_exceeded", f"no candidate model fits the budget: {detail}")
    detail = "; ".join(f"{c.ref}: {e.message}" for c, e in failures)
    return GatewayError(
        400,
        "context_length_exceeded",
        f"the prompt is longer than the context window of every candidate model: {detail}. "
        "Shorten the messages or use a model with a larger context window",
        param="messages",
    )


_REFUSALS = frozenset({Outcome.UNSUPPORTED, Outcome.CONTEXT_LENGTH, Outcome.BUDGET})


def refusal(message: str, param: str) -> UpstreamError:
    """A candidate passed over before any call because its kind cannot take a parameter of the
    request: the cascade moves on; with none left, the client gets this 400 (`_unsupported`)."""
    client_error = GatewayError(400, "invalid_request", message, param=param)
    return UpstreamError(
        Outcome.UNSUPPORTED, message, reason=Outcome.UNSUPPORTED.value, client_error=client_error
    )


def _unsupported(failures: list[tuple[Candidate, UpstreamError]]) -> GatewayError:
    """Every candidate refused before a call, some for a parameter their kind cannot take: the
    400 of that parameter (the change that lets a candidate answer), naming each refusal."""
    refusals = [e.client_error for _, e in failures if e.outcome is Outcome.UNSUPPORTED]
    if len(failures) == 1 and refusals[0] is not None:
        return refusals[0]
    detail = "; ".join(f"{c.ref}: {e.message}" for c, e in failures)
    return GatewayError(
        400,
        "invalid_request",
        f"no candidate model can take this request: {detail}",
        param=refusals[0].param if refusals[0] is not None else None,
    )


def retry_hint(failures: list[tuple[Candidate, UpstreamError]]) -> dict[str, str]:
    """SDKs retry a 503 on their own. The sidecar has retried and escalated already, so it says
    not to (`x-should-retry: false`), unless an upstream asked for a pause: then the longest
    pause asked for, capped per provider by `retry_after_cap` (`Retry-After`)."""
    pauses = [
        min(e.retry_after, c.provider.retry_after_cap)
        for c, e in failures
        if e.retry_after is not None
    ]
    if pauses:
        return {"Retry-After": str(math.ceil(max(pauses)))}
    return {"x-should-retry": "false"}


# a native Responses answer still running upstream (`background: true`): its usage comes later
UNFINISHED = frozenset({"queued", "in_progress"})


def unreported_usage(flow: Flow, completion: Completion, attempt: Attempt) -> Usage:
    """Usage of an answer whose upstream reported none (or nonsense): estimated on the high
    side, never free — the prompt estimate, and a token per 4 bytes of the whole answer. A
    background response, answered before it ran, is charged its worst case (every request
    byte a token, the whole output cap it was sent): the provider bills it when it ends, after
    this request's budget hold is settled, so nothing less would hold a budget."""
    if flow.endpoint == EMBEDDINGS:  # vectors are not tokens: the input is all there is
        return Usage(flow.prompt_tokens_estimate, 0)
    if flow.responses is not None and completion.body.get("status") in UNFINISHED:
        cap = attempt.output_cap
        if cap is None:
            cap = attempt.candidate.output_cap(requested_max_output(flow.body))
        return Usage(flow.body_bytes, cap)
    size = len(completion.raw) if completion.raw is not None else len(orjson.dumps(completion.body))
    return Usage(flow.prompt_tokens_estimate, max(1, size // 4))


def interrupted() -> UpstreamError:
    """The error of an attempt cut short on our side (a cancel: the client went away)."""
    return UpstreamError(Outcome.UNAVAILABLE, "the call was cancelled", reason="cancelled")


async def _read_head(stream: ChunkStream, cascading: bool) -> list[bytes]:
    """The chunks a stream starts with: its first batch, or for a cascade every batch up to
    the first that delivers something (the role-only chunk OpenAI sends first does not)."""
    head: list[bytes] = []
    async for chunks in stream:
        head.extend(chunks)
        if not cascading or any(_delivers(chunk) for chunk in _unframed(chunks)):
            break
    return head


def _unframed(chunks: list[bytes]) -> list[bytes]:
    """The chunks of `chunks`, which may be sse.Framed events."""
    if chunks and type(chunks[0]) is sse.Framed:
        return [data for events in chunks for data in sse.unframe(events)]
    return chunks


def _delivers(chunk: bytes) -> bool:
    """Whether an OpenAI chunk carries what a client shows or acts on: content, a refusal,
    tool calls, a finish reason, or usage (read only for a cascade's first chunks)."""
    try:
        data = orjson.loads(chunk)
    except orjson.JSONDecodeError:
        return True  # not ours to judge: the client sees it as it is
    if not isinstance(data, dict):
        return True
    if data.get("usage"):
        return True
    kind = data.get("type")
    if isinstance(kind, str) and "choices" not in data:  # a native Responses API event
        return kind not in _RESPONSES_PREAMBLE
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict):
            return True
        if choice.get("finish_reason") is not None:
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(
            delta.get(key) for key in ("content", "refusal", "tool_calls", "function_call")
        ):
            return True
    return False


# the events a Responses API stream starts with before it delivers anything
_RESPONSES_PREAMBLE = frozenset(
    {
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    }
)


class Cascade:
    """What a cascade needs of one Runtime: its addon chain, its provider clients, the
    rewrite rules, and whether a provider's circuit is open."""

    def __init__(
        self,
        pipeline: Pipeline,
        providers: Mapping[str, ProviderClient],
        rewrites: Mapping[str, Rewrite],
        circuit_open: Callable[[str], bool],
    ) -> None:
        self.pipeline = pipeline
        self.providers = providers
        self.rewrites = rewrites
        self.circuit_open = circuit_open

    def build_call(self, flow: Flow, attempt: Attempt, body: dict[str, Any]) -> UpstreamCall:
        """The call for `body`; it streams only when the body asks to (a buffered schema
        re-prompt loop sends the body of a streamed request without `stream`). The attempt's
        output cap, when an addon set one, is sent whatever the client or a rewrite asked for."""
        candidate = attempt.candidate
        stream = flow.stream and body.get("stream") is True
        rules = []
        provider_rule = self.rewrites.get("provider:" + candidate.provider.name)
        if provider_rule is not None:
            rules.append(provider_rule)
        if candidate.slot is not None:
            slot_rule = self.rewrites.get("slot:" + candidate.slot)
            if slot_rule is not None:
                rules.append(slot_rule)
        headers: dict[str, str] = {}
        if rules:
            body, headers = _apply_rewrites(body, rules)
        if attempt.output_cap is not None:
            names = (
                RESPONSES_CAP_PARAMS
                if self.native_responses(flow, candidate)
                else OUTPUT_CAP_PARAMS
            )
            body = with_output_cap(body, attempt.output_cap, names)
        return UpstreamCall(
            candidate.provider, candidate.model_id, body, stream, headers, flow.id,
            keep_content=stream and flow.schema_plan is not None,  # validated at the end
            max_output=candidate.entry.max_output if candidate.entry else None,
        )  # fmt: skip

    def _too_small(self, flow: Flow, candidate: Candidate) -> UpstreamError | None:
        """Why `candidate` is passed over before any call: an estimated prompt larger than its
        context window, or a parameter its kind cannot take (`_unsupported`); None to call it."""
        context = candidate.context
        estimate = flow.prompt_tokens_estimate
        if context is not None and estimate > context:
            return UpstreamError(
                Outcome.CONTEXT_LENGTH,
                f"skipped: the estimated prompt ({estimate} tokens) exceeds the "
                f"{context}-token window",
                reason="context_length",
            )
        return self._unsupported(flow, candidate)

    def _unsupported(self, flow: Flow, candidate: Candidate) -> UpstreamError | None:
        """Several choices (`n > 1`) asked of a kind that answers one per call, or embeddings
        of a kind that has none: refused before any call (such a kind would answer one choice,
        or a 400), so that a cascade moves on to a candidate that can; with none left, the
        client gets a 400 naming the provider and the parameter."""
        if flow.endpoint == EMBEDDINGS:
            return self._no_embeddings(candidate)
        responses = flow.responses
        if (
            responses is not None
            and responses.native_only is not None
            and not self.native_responses(flow, candidate)
        ):
            return self._not_native(responses.native_only, candidate)
        choices = flow.body.get("n")
        if not isinstance(choices, int) or choices <= 1:
            return None
        provider = candidate.provider
        if self.providers[provider.name].caps.n:
            return None
        return refusal(
            f"provider {provider.name!r} (kind {provider.kind}) answers one choice per request: "
            f"n={choices} is not supported there; send n=1, or use a model whose provider takes n",
            "n",
        )

    def _no_embeddings(self, candidate: Candidate) -> UpstreamError | None:
        provider = candidate.provider
        if self.providers[provider.name].caps.embeddings:
            return None
        return refusal(
            f"provider {provider.name!r} (kind {provider.kind}) has no embeddings API: use a "
            "model of a provider that embeds (match:caps=embeddings picks one)",
            "model",
        )

    def _not_native(self, native_only: tuple[str, str], candidate: Candidate) -> UpstreamError:
        """A Responses API request that only a provider with the native API can answer (server-
        side state, built-in tools), to a candidate that is sent it translated onto chat."""
        param, why = native_only
        provider = candidate.provider
        native = sorted(name for name, client in self.providers.items() if client.caps.responses)
        where = (
            f"use a model of a provider that has it ({', '.join(native)})"
            if native
            else "no configured provider has it"
        )
        return refusal(
            f"{param} {why}, and provider {provider.name!r} (kind {provider.kind}) has no "
            f"native Responses API (a Responses request is translated onto its chat API): "
            f"{where}, or leave {param} out",
            param,
        )

    def native_responses(self, flow: Flow, candidate: Candidate) -> bool:
        """Whether a Responses API request goes to `candidate` as the client sent it (its kind
        has the native API), rather than translated onto chat (`flow.body`)."""
        return flow.responses is not None and self.providers[candidate.provider.name].caps.responses

    def _sender(
        self, flow: Flow, candidate: Candidate
    ) -> Callable[[UpstreamCall], Awaitable[Completion]]:
        client = self.providers[candidate.provider.name]
        if flow.endpoint == EMBEDDINGS:
            return client.embed
        if self.native_responses(flow, candidate):
            return cast(ResponsesClient, client).respond  # caps.responses
        return client.complete

    async def call(self, flow: Flow, candidate: Candidate, body: dict[str, Any]) -> Completion:
        """Call a candidate, retrying it as its provider's `retries` allow; the answer's
        usage and cost are recorded on its Attempt."""
        send = self._sender(flow, candidate)
        attempt, completion = await self._tries(flow, candidate, body, send)
        usage = completion.usage or unreported_usage(flow, completion, attempt)
        self._settle(flow, attempt, usage)
        await self.pipeline.run("attempt_done", flow, attempt)
        return completion

    async def _tries(
        self,
        flow: Flow,
        candidate: Candidate,
        body: dict[str, Any],
        send: Callable[[UpstreamCall], Awaitable[T]],
    ) -> tuple[Attempt, T]:
        """`send` the call of a new Attempt for `candidate`, again while `retry_delay` allows.
        Each try is an Attempt with hooks around it: a failed one is settled here (its
        `attempt_done` hooks run); the one that answers is returned open, for the caller to
        settle once it knows the usage (at once for an answer, at the end for a stream). The
        last failure is raised, and so is a refusal by an `attempt` hook (never retried)."""
        pipeline = self.pipeline
        tries = 0
        while True:
            attempt = await self.begin(flow, candidate)
            try:
                return attempt, await send(self.build_call(flow, attempt, body))
            except UpstreamError as error:
                attempt.error = kept(error)
                self._settle(flow, attempt, error.usage)
                await pipeline.run("attempt_done", flow, attempt)
                delay = retry_delay(candidate.provider, tries, error)
                if delay is None:
                    raise
            except BaseException:  # the client went away before the answer (or its head)
                attempt.error = interrupted()
                self._settle(flow, attempt, None)
                await pipeline.run("attempt_done", flow, attempt)
                raise
            tries += 1
            await asyncio.sleep(delay)

    async def begin(self, flow: Flow, candidate: Candidate) -> Attempt:
        """A new Attempt, after the `attempt` hooks; a hook that refuses the candidate (the
        budget cannot cover it) makes it an UpstreamError that the cascade escalates from,
        and the attempt, never made, is not kept; any other failure ends the attempt as
        interrupted, its `attempt_done` hooks run."""
        attempt = Attempt(candidate)
        flow.attempts.append(attempt)
        try:
            await self.pipeline.run("attempt", flow, attempt)
        except CandidateRefused as refused:
            flow.attempts.remove(attempt)
            raise refused.as_failure() from None
        except BaseException:  # a later hook failed, or the client left: release what earlier
            attempt.error = interrupted()  # hooks took (a budget hold) through attempt_done
            self._settle(flow, attempt, None)
            await self.pipeline.run("attempt_done", flow, attempt)
            raise
        return attempt

    @staticmethod
    def _settle(flow: Flow, attempt: Attempt, usage: Usage | None) -> None:
        attempt.seconds = time.perf_counter() - attempt.started
        flow.upstream_seconds += attempt.seconds
        attempt.usage = usage or Usage()
        attempt.cost_usd = usage_cost(attempt.candidate, attempt.usage)
        flow.usage.add(attempt.usage)
        flow.cost_usd += attempt.cost_usd

    def native_schema(self, candidate: Candidate, kind: str = "json_schema") -> bool:
        """Whether the candidate's provider takes a `response_format` of this kind natively:
        json_schema as its native_json_schema says, json_object where it has a JSON mode."""
        client = self.providers[candidate.provider.name]
        return client.json_mode if kind == "json_object" else client.native_json_schema

    async def answer(self, flow: Flow, candidate: Candidate) -> Completion:
        """A candidate's final answer; schema enforcement wraps the call when asked for."""
        plan = flow.schema_plan
        if flow.responses is not None and self.native_responses(flow, candidate):
            # as the client sent it: the provider applies text.format itself
            return await self.call(flow, candidate, flow.responses.request)
        if plan is None:
            return await self.call(flow, candidate, flow.body)
        client = self.providers[candidate.provider.name]
        return await enforce(
            self.call, flow, candidate, plan, client.native_json_schema, client.json_mode
        )

    async def run(self, flow: Flow) -> tuple[Candidate, Completion]:
        """Try each candidate in order; return the first answer or raise the cascade's error."""
        assert flow.route is not None
        failures: list[tuple[Candidate, UpstreamError]] = []
        previous: tuple[Candidate, UpstreamError] | None = None
        for candidate in flow.route.candidates:
            if not self._calls(flow, candidate, failures, previous):
                continue
            try:
                completion = await self.answer(flow, candidate)
            except UpstreamError as error:
                if not error.outcome.escalates:
                    assert error.client_error is not None
                    raise error.client_error from None
                failures.append((candidate, kept(error)))
                previous = (candidate, error)
                continue
            flow.model_used = candidate.ref
            return candidate, completion
        raise exhausted(failures, flow.route.skipped_open)

    async def open_stream(
        self, flow: Flow, framed: bool = False
    ) -> tuple[Attempt, ChunkStream, list[bytes]]:
        """Open the stream of the first candidate that answers, and read its head: the chunks
        up to the first that delivers something (content, a tool call, a finish), which the
        client has not seen yet. Until then a failure escalates to the next candidate as in
        `run` (a slot or `match:` cascade streams, SPEC 2.2); a single candidate's head is its
        first batch. Failures raise here, as the cascade's error. `framed`: the stream, when
        it can, hands out sse.Framed events (to be sent as they are) from the head on."""
        route = flow.route
        assert route is not None
        cascading = route.is_cascade
        failures: list[tuple[Candidate, UpstreamError]] = []
        previous: tuple[Candidate, UpstreamError] | None = None
        for candidate in route.candidates:
            if not self._calls(flow, candidate, failures, previous):
                continue
            client = self.providers[candidate.provider.name]
            body, opener = flow.body, client.open_stream
            if flow.responses is not None and self.native_responses(flow, candidate):
                body = flow.responses.request
                opener = cast(ResponsesClient, client).open_response_stream  # caps.responses
            try:
                attempt, stream = await self._tries(flow, candidate, body, opener)
            except UpstreamError as error:  # refused by a hook, or the last try failed
                failure = error
            else:
                frame_events = getattr(stream, "frame_events", None) if framed else None
                if frame_events is not None:
                    frame_events()
                try:
                    return attempt, stream, await _read_head(stream, cascading)
                except UpstreamError as error:
                    await self.fail_stream(flow, attempt, stream, error)
                    failure = error
                except BaseException:
                    await self.finish_stream(flow, attempt, stream)
                    raise
            if not (cascading and failure.outcome.escalates):
                raise self.as_gateway_error(candidate, failure, flow) from None
            failures.append((candidate, kept(failure)))
            previous = (candidate, failure)
        raise exhausted(failures, route.skipped_open)

    def _calls(
        self,
        flow: Flow,
        candidate: Candidate,
        failures: list[tuple[Candidate, UpstreamError]],
        previous: tuple[Candidate, UpstreamError] | None,
    ) -> bool:
        """Whether a cascade calls `candidate` now (`previous`: the failure it escalates from),
        recording why not (too small, a kind that cannot take the request, a circuit this very
        cascade opened) or the fallback that leads to it."""
        assert flow.route is not None
        skipped = self._too_small(flow, candidate)
        if skipped is not None:
            failures.append((candidate, skipped))
            return False
        if previous is not None:
            if self.circuit_open(candidate.provider.name):
                # opened by the failures of this very cascade: one request must not go on
                # calling a provider that its own earlier candidates just took down
                flow.route.skipped_open.append(candidate.ref)
                return False
            flow.fallbacks.append((previous[0].label, candidate.label, previous[1].outcome.value))
        flow.models_tried.append(candidate.ref)
        return True

    def as_gateway_error(
        self, candidate: Candidate, error: UpstreamError, flow: Flow
    ) -> GatewayError:
        if not error.outcome.escalates and error.client_error is not None:
            return error.client_error
        assert flow.route is not None
        return exhausted([(candidate, error)], flow.route.skipped_open)

    async def fail_stream(
        self, flow: Flow, attempt: Attempt, stream: ChunkStream | None, error: UpstreamError
    ) -> None:
        attempt.error = kept(error)
        await self.finish_stream(flow, attempt, stream)

    async def finish_stream(self, flow: Flow, attempt: Attempt, stream: ChunkStream | None) -> None:
        """Close the upstream stream and charge what it produced, even when cut short."""
        if stream is not None:
            await stream.aclose()
        usage = stream.usage if stream is not None else None
        if usage is None and stream is not None and stream.produced:
            usage = Usage(flow.prompt_tokens_estimate, max(1, stream.produced // 4))
        self._settle(flow, attempt, usage)
        if attempt.error is None:
            flow.model_used = attempt.candidate.ref
        await self.pipeline.run("attempt_done", flow, attempt)
