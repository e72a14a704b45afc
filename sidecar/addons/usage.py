"""One usage record per request (SPEC 4), written in the background so no response waits.

The cost of a budgeted customer's attempts is already in the record (each settle adds it in
the same atomic write as the spent); the `done` hook adds whatever no settle recorded and the
request's other fields. Records reach the store in batches from one writer task; a graceful
stop writes out the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sidecar.flow import Flow
from sidecar.ids import new_id
from sidecar.providers.base import Usage
from sidecar.stores.budget import BudgetStore, Charge, Finished, UsageRecord, to_nano

log = logging.getLogger("ringside")

BATCH = 500
MAX_QUEUED = 200_000  # beyond this (a store down for long), the oldest records are dropped


def usage_id(flow: Flow) -> str:
    """The request's record id: unique even when clients reuse an X-Request-Id."""
    found = flow.usage_id
    if found is None:
        found = flow.usage_id = new_id()
    return found


def note_charged(flow: Flow, cost: int, usage: Usage) -> None:
    """Record that `cost` and `usage` of an attempt are in the usage record already."""
    nano, prompt, completion = flow.usage_charged
    flow.usage_charged = (
        nano + cost,
        prompt + usage.prompt_tokens,
        completion + usage.completion_tokens,
    )


class UsageWriter:
    """Queues finished records and writes them from one background task."""

    def __init__(self, store: BudgetStore, retry_delay: float = 1.0) -> None:
        self.store = store
        self.retry_delay = retry_delay
        self._queue: list[Finished] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def submit(self, finished: Finished) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._queue.append(finished)
        if len(self._queue) > MAX_QUEUED:
            del self._queue[: len(self._queue) - MAX_QUEUED]
            log.error("usage records are not being written: dropped the oldest")
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = self._queue[:BATCH]
                try:
                    await self.store.write_usage(batch)
                except Exception:
                    if self._closing:
                        log.exception("could not write %d usage records", len(self._queue))
                        return
                    log.exception("writing usage records failed; retrying")
                    await asyncio.sleep(self.retry_delay)
                    continue
                del self._queue[: len(batch)]
            if self._closing:
                return

    async def close(self) -> None:
        """Write out what is queued, then stop."""
        self._closing = True
        if self._task is None:
            return
        self._wake.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class UsageAddon:
    def __init__(self, writer: UsageWriter) -> None:
        self.writer = writer

    def done(self, flow: Flow) -> None:
        if flow.error is not None and flow.error.code == "invalid_api_key":
            return  # not a caller of ours: nothing to account
        principal = flow.principal
        cost = prompt = completion = 0
        for attempt in flow.attempts:
            cost += to_nano(attempt.cost_usd)
            if attempt.usage is not None:
                prompt += attempt.usage.prompt_tokens
                completion += attempt.usage.completion_tokens
        charged = flow.usage_charged
        record_id = usage_id(flow)
        record = UsageRecord(
            id=record_id,
            time=flow.started_wall,
            request_id=flow.id,
            key_id=principal.key_id,
            developer=principal.developer,
            customer=principal.customer,
            refs_tried=tuple(flow.models_tried),
            ref_used=flow.model_used,
            status=flow.status,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost=cost,
            latency_ms=round(flow.seconds * 1000, 3),
            fallback=flow.fallback_triggered,
            reprompts=flow.reprompts,
        )
        rest = Charge(
            record_id + ":final", cost - charged[0], prompt - charged[1], completion - charged[2]
        )
        self.writer.submit(Finished(record, rest))
