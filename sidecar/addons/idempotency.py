"""Idempotency-Key (SPEC 2.5): a request runs once per key; repeats get its stored answer.

Records are scoped to the caller's key (`principal.key_id`, `anonymous` in open mode), so two
callers using the same Idempotency-Key never see each other's answers. A request is identified
by its fingerprint: SHA-256 of the canonical body (keys sorted) and of the FC-Customer header,
since who is charged is part of the request.

The `request` hook (after auth and rate limits) does nothing, and calls no store, without the
header or with a malformed one (chat.py answers that with a 400). Otherwise:
  - first use: the key is taken with a lease of LEASE_SECONDS, renewed while the request runs
    (a crashed sidecar frees its keys within a lease), and the api layer is asked to capture
    what it sends;
  - same body, first one finished: its answer (status, headers incl. X-Ringside-* and the
    original X-Request-Id, body; a stream's SSE bytes, replayed as `text/event-stream`) is
    sent again plus `Idempotent-Replayed: true`. No upstream call, nothing charged;
  - same body, first one still running (here or in a sidecar sharing the store): the repeat
    polls until the first finishes and replays its answer; if the first ends without a stored
    answer the key is free again and the repeat runs the request itself. A repeat still
    waiting after WAIT_SECONDS gets `409 idempotency_key_reused` with `Retry-After`;
  - different body: `409 idempotency_key_reused`.

What is stored (the `done` hook), for RECORD_TTL_SECONDS (24 h): the final answers that are the
request's own outcome, as the client got them — every 2xx, and 4xx such as an invalid request,
a model not found or not allowed, an upstream's client-fault answer, a schema failure after the
re-prompts (for a stream, the events up to its error event). Not stored, the key released so
a retry runs afresh: 5xx (upstream_unavailable, internal errors), a stream cut short by an
upstream failure, a client that disconnected (499), and the 4xx that a later retry may pass:
402 budget_exceeded, 408, 409, 429.

When the store is down: with `storage.fail_open` the request runs without idempotency; without
it, `503 store_unavailable`. Either way one warning per outage, not per request (outage.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable
from dataclasses import dataclass

import orjson
from aiohttp import web
from multidict import CIMultiDict

from sidecar.errors import GatewayError
from sidecar.flow import Flow
from sidecar.outage import Outage
from sidecar.stores import ClaimState, IdempotencyStore, StoreUnavailable

log = logging.getLogger("ringside")

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
ANONYMOUS = "anonymous"
RECORD_TTL_SECONDS = 24 * 3600.0
LEASE_SECONDS = 30.0
WAIT_SECONDS = 300.0
FIRST_POLL_SECONDS = 0.02
MAX_POLL_SECONDS = 0.25
NOT_STORED_4XX = frozenset({402, 408, 409, 429})
SKIPPED = "requests run without idempotency (fail_open)"  # while the store is down
REFUSED = "requests with an Idempotency-Key refused with 503"
NOT_SAVED = "answers not stored (their keys are free again after the lease)"
# set per response by the HTTP server, never part of a stored answer
_TRANSPORT_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}
)


def well_formed(key: str) -> bool:
    return 1 <= len(key) <= 255 and key.isprintable()


def fingerprint(flow: Flow) -> str:
    digest = hashlib.sha256((flow.principal.customer or "").encode())
    digest.update(b"\0")
    digest.update(orjson.dumps(flow.body, option=orjson.OPT_SORT_KEYS))
    return digest.hexdigest()


def encode_record(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    return orjson.dumps({"status": status, "headers": headers}) + b"\n" + body


def decode_record(record: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    head, _, body = record.partition(b"\n")
    meta = orjson.loads(head)
    return int(meta["status"]), [(k, v) for k, v in meta["headers"]], body


def replay(record: bytes) -> web.Response:
    status, headers, body = decode_record(record)
    response = web.Response(status=status, body=body, headers=CIMultiDict(headers))
    response.headers[REPLAYED] = "true"
    return response


def stored_answer(flow: Flow) -> bytes | None:
    """The record of the answer the client got, or None when it must not be stored."""
    answer = flow.answer
    status = flow.status  # the outcome; a stream that failed after its headers still sent 200
    if answer is None or status >= 499 or status in NOT_STORED_4XX:
        return None
    if isinstance(answer, web.Response):
        body = answer.body
        if not isinstance(body, bytes | bytearray):
            return None
        body = bytes(body)
    else:
        body = b"".join(flow.capture or ())
    headers = [(k, v) for k, v in answer.headers.items() if k.lower() not in _TRANSPORT_HEADERS]
    return encode_record(answer.status, headers, body)


# SDKs retry a 409 on their own: a reused key fails the same way again, and a request still
# running is the caller's to wait for (SPEC 2.2)
NO_SDK_RETRY = {"x-should-retry": "false"}


def reused(key: str) -> GatewayError:
    return GatewayError(
        409,
        "idempotency_key_reused",
        f"Idempotency-Key {key!r} was already used with a different request body: "
        "send a new key for a new request",
        param=HEADER,
        headers=NO_SDK_RETRY,
    )


def still_running(key: str, waited: float) -> GatewayError:
    return GatewayError(
        409,
        "idempotency_key_reused",
        f"the first request with Idempotency-Key {key!r} is still running after {waited:.0f}s "
        "of waiting: retry later with the same key to get its answer",
        param=HEADER,
        headers={"Retry-After": "1", **NO_SDK_RETRY},
    )


@dataclass(slots=True)
class HeldClaim:
    scope: str
    key: str
    token: str
    renewal: asyncio.Task[None]


class Idempotency:
    def __init__(
        self,
        store: IdempotencyStore,
        *,
        fail_open: bool = False,
        ttl: float = RECORD_TTL_SECONDS,
        lease: float = LEASE_SECONDS,
        wait: float = WAIT_SECONDS,
        outage: Outage | None = None,  # kept across reloads (runtime.Services)
    ) -> None:
        self.store = store
        self.outage = outage or Outage("idempotency")
        self.fail_open = fail_open
        self.ttl = ttl
        self.lease = lease
        self.wait = wait

    def request(self, flow: Flow) -> Awaitable[None] | None:
        key = flow.headers.get(HEADER)
        if key is None or not well_formed(key):
            return None  # most requests: nothing to wait for (see sidecar/pipeline.py)
        return self._claim(flow, key)

    async def _claim(self, flow: Flow, key: str) -> None:
        scope = flow.principal.key_id or ANONYMOUS
        request_fingerprint = fingerprint(flow)
        loop = asyncio.get_running_loop()
        started = loop.time()
        pause = FIRST_POLL_SECONDS
        while True:
            try:
                claim = await self.store.begin(scope, key, request_fingerprint, self.lease)
                if self.outage.down:
                    self.outage.answered()
            except StoreUnavailable as exc:
                if self.fail_open:
                    self.outage.failed("begin", SKIPPED, exc)
                    return
                self.outage.failed("begin", REFUSED, exc)
                raise GatewayError(
                    503,
                    "store_unavailable",
                    "the idempotency store is unavailable; retry later with the same key",
                ) from None
            if claim.state is ClaimState.OWNED:
                renewal = asyncio.create_task(self._renew(scope, key, claim.token))
                flow.idempotency_claim = HeldClaim(scope, key, claim.token, renewal)
                flow.capture = []
                return
            if claim.state is ClaimState.DONE:
                assert claim.record is not None
                response = replay(claim.record)
                flow.response, flow.status = response, response.status
                flow.stream = flow.body.get("stream") is True
                return
            if claim.state is ClaimState.CONFLICT:
                raise reused(key)
            waited = loop.time() - started
            if waited >= self.wait:
                raise still_running(key, waited)
            await asyncio.sleep(min(pause, self.wait - waited))
            pause = min(pause * 2, MAX_POLL_SECONDS)

    async def _renew(self, scope: str, key: str, token: str) -> None:
        """Keep the lease of a running request alive; a crashed sidecar stops renewing."""
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                if not await self.store.extend(scope, key, token, self.lease):
                    log.warning("idempotency lease of key %r was lost while running", key)
                    return
            except StoreUnavailable as exc:
                self.outage.failed("renew", "lease renewals failed", exc)
                continue
            if self.outage.down:
                self.outage.answered()

    def done(self, flow: Flow) -> Awaitable[None] | None:
        held, flow.idempotency_claim = flow.idempotency_claim, None
        if held is None:
            return None
        return self._finish(flow, held)

    async def _finish(self, flow: Flow, held: HeldClaim) -> None:
        held.renewal.cancel()
        record = stored_answer(flow)
        try:
            if record is None:
                await self.store.release(held.scope, held.key, held.token)
            elif not await self.store.complete(held.scope, held.key, held.token, record, self.ttl):
                log.warning("idempotency key %r expired before its answer was stored", held.key)
        except StoreUnavailable as exc:
            self.outage.failed("finish", NOT_SAVED, exc)
            return
        if self.outage.down:
            self.outage.answered()
