"""Gateway errors in the OpenAI envelope, and the Outcome classes that decide escalation.

Every error a client sees is a `GatewayError`; every upstream failure is an `UpstreamError`
carrying the one `Outcome` that the cascade looks at. Nothing else decides escalation.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, TypeVar

import orjson

if TYPE_CHECKING:
    from sidecar.providers.base import Usage

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_response_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


E = TypeVar("E", bound=BaseException)


class GatewayError(Exception):
    """An error answered to the client as `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        error_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.error_type = error_type or _TYPE_BY_STATUS.get(status, "api_error")
        self.headers = dict(headers or {})

    def envelope(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.envelope())


def kept(error: E) -> E:
    """`error`, without the tracebacks of it and of its context chain, to be kept beyond its
    `except` block (on a Flow, an Attempt, a list of failures).

    A traceback holds the frames it went through, each its caller's (up to the request's
    handler, which holds the Flow): an exception kept on the Flow closes a reference cycle, and
    the request's body, its parsed JSON and its upstream buffers then wait for a full garbage
    collection instead of being freed when the request ends (a client sending big bodies grew
    the process by ~1 MiB a request). Nothing reads these tracebacks: an internal error is
    logged with its own where it is caught."""
    seen: BaseException | None = error
    hops = 0
    while seen is not None and hops < 16:  # a context chain is short; a loop must not hang us
        seen.__traceback__ = None
        seen = seen.__context__
        hops += 1
    return error


def invalid_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, "invalid_request", message, param=param)


def internal_error(request_id: str) -> GatewayError:
    """A bug of ours: logged with its traceback, answered without one."""
    return GatewayError(
        500, "internal_error", f"internal error; quote request id {request_id} when reporting it"
    )


def server_shutting_down() -> GatewayError:
    """A request still running when the shutdown's grace ran out (sidecar/shutdown.py)."""
    return GatewayError(
        503,
        "server_shutting_down",
        "the sidecar is shutting down and its grace period (shutdown.grace_seconds) ended "
        "before this answer was complete; what was produced is charged; retry the request",
        headers={"Retry-After": "1"},
    )


class Outcome(enum.Enum):
    """How an upstream failure is treated: the request's fault, or a reason to escalate."""

    CLIENT_FAULT = "client_fault"  # returned at once with the upstream's status, never escalates
    UNAVAILABLE = "upstream_unavailable"  # 5xx, 408, 429, 401/403, timeouts, resets, bad bodies
    CONTEXT_LENGTH = "context_length"  # the prompt does not fit this model: try a bigger one
    SCHEMA_FAILURE = "response_schema_validation_failed"  # content never matched the schema
    BUDGET = "budget"  # the caller's budget cannot cover this candidate: try a cheaper one
    UNSUPPORTED = "unsupported_param"  # a parameter this candidate's kind cannot take (n > 1)

    @property
    def escalates(self) -> bool:
        return self is not Outcome.CLIENT_FAULT


class UpstreamError(Exception):
    """One failed upstream attempt, already classified."""

    def __init__(
        self,
        outcome: Outcome,
        message: str,
        *,
        status: int | None = None,
        reason: str = "error",
        client_error: GatewayError | None = None,
        retry_after: float | None = None,
        detail: str | None = None,
        usage: Usage | None = None,
    ) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message  # what the client may be told
        self.status = status
        self.reason = reason  # short metric label: http_503, timeout, connect, bad_body, schema …
        self.client_error = client_error
        self.retry_after = retry_after
        self.detail = detail  # the upstream's own words where the client must not see them: logs
        # what the provider billed before the attempt failed (the answered batches of a batched
        # embeddings request): charged like an answer's usage
        self.usage = usage


class CandidateRefused(GatewayError):
    """Raised by an `attempt` hook to refuse one cascade candidate, not the whole request: the
    cascade moves on to the next candidate, and answers this error when none is left."""

    def __init__(self, error: GatewayError, outcome: Outcome) -> None:
        super().__init__(
            error.status, error.code, error.message, param=error.param,
            error_type=error.error_type, headers=error.headers,
        )  # fmt: skip
        self.outcome = outcome

    def as_failure(self) -> UpstreamError:
        return UpstreamError(
            self.outcome, self.message, reason=self.outcome.value, client_error=self
        )


_CONTEXT_MARKERS = (
    "context_length_exceeded",
    "context length",
    "context window",
    "maximum context",
    "too many tokens",
    "prompt is too long",
    "input is too long",
)


def looks_like_context_length(code: str | None, message: str) -> bool:
    text = f"{code or ''} {message}".lower()
    return any(marker in text for marker in _CONTEXT_MARKERS)


def classify_http_failure(
    status: int,
    message: str,
    *,
    code: str | None = None,
    error_type: str | None = None,
    param: str | None = None,
    retry_after: float | None = None,
) -> UpstreamError:
    """Map an upstream HTTP failure onto an Outcome (SPEC 2.2).

    5xx, 408, 429 and 401/403 (the provider rejected *our* key) escalate; a context-length
    error escalates to a model with a bigger window; any other 4xx is the request's fault and
    is handed back to the client with the upstream's own status and message.
    """
    reason = f"http_{status}"
    if status in (401, 403):  # the upstream's text may quote our key: for the log only
        return UpstreamError(
            Outcome.UNAVAILABLE,
            f"the provider rejected the gateway's credentials (HTTP {status}); the sidecar's "
            "log has the provider's answer",
            status=status,
            reason=reason,
            retry_after=retry_after,
            detail=message,
        )
    if status < 400:  # no redirect is followed: the URL comes from the config, never a reply
        return UpstreamError(
            Outcome.UNAVAILABLE,
            f"upstream answered HTTP {status} instead of an answer (a redirect is not "
            "followed): check the provider's base_url",
            status=status,
            reason=reason,
        )
    if status >= 500 or status in (408, 429):
        return UpstreamError(
            Outcome.UNAVAILABLE,
            f"upstream answered {status}: {message}",
            status=status,
            reason=reason,
            retry_after=retry_after,
        )
    if looks_like_context_length(code, message):
        return UpstreamError(
            Outcome.CONTEXT_LENGTH,
            f"upstream rejected the prompt as too long: {message}",
            status=status,
            reason="context_length",
        )
    client_error = GatewayError(
        status,
        code or "invalid_request",
        message or f"upstream rejected the request ({status})",
        param=param,
        error_type=error_type,
    )
    return UpstreamError(
        Outcome.CLIENT_FAULT, message, status=status, reason=reason, client_error=client_error
    )
