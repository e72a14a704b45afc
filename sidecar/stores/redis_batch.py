"""Automatic pipelining of Lua script calls: one round trip for a whole event-loop turn.

Under load many requests reach their budget reserve or rate-limit check in the same turn of
the event loop; sending each EVALSHA on its own costs a socket write, a read and a wake-up
per call. `ScriptBatcher.call` queues the call and returns a future; at the end of the turn
every queued call leaves in one pipeline (no MULTI: each script is atomic on its own, so the
result is exactly that of sending them one by one in this order). A lone request pays no
extra wait: its call leaves in the same turn.

A batcher may bound its round trips more tightly than the pool's socket timeout (`timeout`):
stores with different patience share one pool (redis_pool), and a round trip cut short
disconnects its connection (redis-py does on a cancelled read), so no reply is left behind on
a pooled one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeout

Call = tuple[str, Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    def __init__(
        self, client: Redis, scripts: Mapping[str, AsyncScript], timeout: float | None = None
    ) -> None:
        self.client = client
        self.scripts = dict(scripts)
        self.timeout = timeout  # seconds a round trip may take, connect and retry included
        self._pending: list[Call] = []
        self._sending: set[asyncio.Task[None]] = set()

    def call(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Run script `name`; the future holds its reply, or the error (connection errors
        included) that sending it met."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((name, keys, args, future))
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[Call], reloaded: bool = False) -> None:
        pipe = self.client.pipeline(transaction=False)
        for name, keys, args, _ in batch:
            pipe.evalsha(self.scripts[name].sha, len(keys), *keys, *args)
        try:
            replies = await self._execute(pipe)
        except BaseException as exc:  # the connection failed: every call in it did
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        unknown: list[Call] = []
        for call, reply in zip(batch, replies, strict=True):
            future = call[3]
            if isinstance(reply, NoScriptError) and not reloaded:
                unknown.append(call)  # the server restarted and lost its script cache
            elif future.done():
                continue  # the caller gave up (cancelled); the script ran all the same
            elif isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)
        if unknown:
            try:
                for name in {call[0] for call in unknown}:
                    await self.client.script_load(self.scripts[name].script)
            except Exception as exc:
                for *_, future in unknown:
                    if not future.done():
                        future.set_exception(exc)
                return
            await self._send(unknown, reloaded=True)

    async def _execute(self, pipe: Any) -> list[Any]:
        if self.timeout is None:
            return await pipe.execute(raise_on_error=False)
        try:
            async with asyncio.timeout(self.timeout):
                return await pipe.execute(raise_on_error=False)
        except TimeoutError:
            raise RedisTimeout(f"no reply from redis within {self.timeout}s") from None

    async def drain(self) -> None:
        """Wait for the calls already queued or in flight (before closing the client)."""
        while self._pending or self._sending:
            if self._pending:
                self._flush()
            await asyncio.wait(set(self._sending))
