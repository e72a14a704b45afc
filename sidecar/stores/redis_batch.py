"""Automatic pipelining of Lua script calls: one round trip for a whole event-loop turn.

Under load many requests reach their budget reserve or rate-limit check in the same turn of
the event loop; sending each EVALSHA on its own costs a socket write, a read and a wake-up
per call. `ScriptBatcher.call` queues the call and returns a future; at the end of the turn
every queued call leaves in one write (no MULTI: each script is atomic on its own, so the
result is exactly that of sending them one by one in this order). A lone request pays no
extra wait: its call leaves in the same turn.

The round trip bypasses redis-py's Pipeline: its pure-Python command packing (a call per
argument) and its per-execute pool checkout were most of what a redis request cost the
sidecar (bench/README.md, "The redis store"). Commands are packed by hiredis's C packer, the
same bytes redis-py sends (str as UTF-8, int and float as their repr), and written on a
connection of the store's pool; replies are read by the connection's own parser, an error
reply becoming that call's exception. A script's first call from a batcher is preceded, in
the same write, by its SCRIPT LOAD (without it, the first calls on a fresh server were
NOSCRIPT, reloaded and resent a round trip later: after calls queued behind them, a rate-limit
adjustment after the next request's check); a NOSCRIPT later (a server restarted or flushed)
reloads and resends those calls. A batcher keeps one connection of
the pool between round trips (when the pool holds at least KEEP_MIN, so a small pool is never
starved by idle batchers); any other is taken from the pool and given back at once. As with
redis-py's pipeline under the pool's `Retry(NoBackoff(), 1)`, a batch whose connection fails
(a stale pooled connection: redis restarted, an idle timeout) is sent once more at once, on
a new connection.

A batcher may bound its round trips more tightly than the pool's socket timeout (`timeout`):
stores with different patience share one pool (redis_pool), and a round trip cut short
disconnects its connection, so no reply is left behind on a pooled one.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from typing import Any

import hiredis
from hiredis import pack_command
from redis._parsers.hiredis import NOT_ENOUGH_DATA
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

Call = tuple[str, Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]
KEEP_MIN = 8  # a pool smaller than this: the batcher keeps no connection between round trips
RETRIED = (RedisConnectionError, RedisTimeout)  # what the pool's Retry retries
READ_SIZE = 65536  # redis-py's socket_read_size
PUSH = getattr(hiredis, "PushNotification", None)  # RESP3 out-of-band messages (none expected)


def _packed(*parts: Any) -> bytes:
    """One command in the redis protocol (hiredis's stub types its argument as a 1-tuple)."""
    return pack_command(parts)


def wire(conn: AbstractConnection) -> tuple[Any, asyncio.StreamReader] | None:
    """The connection's hiredis reader and its stream (redis-py's hiredis parser, set up at
    connect), or None for another parser."""
    parser = getattr(conn, "_parser", None)
    reader, stream = getattr(parser, "_reader", None), getattr(parser, "_stream", None)
    if reader is None or stream is None or not hasattr(reader, "gets"):
        return None
    return reader, stream


async def read_replies(conn: AbstractConnection, count: int) -> list[Any]:
    """`count` replies, an error reply as its exception instance. Parsed by the connection's
    hiredis reader straight from its stream: redis-py's `read_response` costs a dozen Python
    calls per reply (its timeout, the host's name for errors, push handling)."""
    found = wire(conn)
    replies: list[Any] = []
    if found is None:
        for _ in range(count):
            try:
                replies.append(await conn.read_response(timeout=math.inf))
            except ResponseError as exc:  # an error reply: the connection is in step
                replies.append(exc)
        return replies
    reader, stream = found
    while len(replies) < count:
        reply = reader.gets()
        if reply is NOT_ENOUGH_DATA:
            try:
                data = await stream.read(READ_SIZE)
            except OSError as exc:
                raise RedisConnectionError(f"reading from redis failed: {exc}") from exc
            if not data:
                raise RedisConnectionError("redis closed the connection")
            reader.feed(data)
        elif isinstance(reply, RedisConnectionError):
            raise reply
        elif PUSH is None or not isinstance(reply, PUSH):
            replies.append(reply)
    return replies


async def write(conn: AbstractConnection, packed: bytes) -> None:
    """Write on the connection (opened if it is not), waiting only for a full send buffer:
    redis-py's `send_packed_command` runs each write in a task of its own (`wait_for`)."""
    if not conn.is_connected:
        await conn.connect()
    writer = conn._writer
    assert writer is not None
    try:
        writer.write(packed)
        if writer.transport.get_write_buffer_size():
            await writer.drain()
    except OSError as exc:
        raise RedisConnectionError(f"writing to redis failed: {exc}") from exc


class ScriptBatcher:
    def __init__(
        self, client: Redis, scripts: Mapping[str, AsyncScript], timeout: float | None = None
    ) -> None:
        self.client = client
        self.scripts = dict(scripts)
        self.timeout = timeout  # seconds a round trip may take, connect and retry included
        self.pool = client.connection_pool
        self._keep = (getattr(self.pool, "max_connections", 0) or 0) >= KEEP_MIN
        self._kept: AbstractConnection | None = None
        self._loaded: set[str] = set()  # scripts this batcher has sent SCRIPT LOAD for
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
        scripts = self.scripts
        # a script this batcher has not loaded yet goes first in the same write (SCRIPT LOAD),
        # so its first call is not a NOSCRIPT answered a round trip later, out of order
        loading = [name for name in {call[0] for call in batch} if name not in self._loaded]
        packed = b"".join(
            [_packed("SCRIPT", "LOAD", scripts[name].script) for name in loading]
            + [
                _packed("EVALSHA", scripts[name].sha, len(keys), *keys, *args)
                for name, keys, args, _ in batch
            ]
        )
        try:
            replies = await self._execute(packed, len(loading) + len(batch))
        except BaseException as exc:  # the connection failed: every call in it did
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        if loading:
            self._loaded.update(loading)
            replies = replies[len(loading) :]
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
            self._loaded.difference_update(call[0] for call in unknown)
            await self._send(unknown, reloaded=True)

    async def _execute(self, packed: bytes, count: int) -> list[Any]:
        if self.timeout is None:
            return await self._round_trip(packed, count)
        try:
            async with asyncio.timeout(self.timeout):
                return await self._round_trip(packed, count)
        except TimeoutError:
            raise RedisTimeout(f"no reply from redis within {self.timeout}s") from None

    async def _round_trip(self, packed: bytes, count: int) -> list[Any]:
        conn, self._kept = self._kept, None
        if conn is None:
            conn = await self.pool.get_connection()
        try:
            try:
                replies = await self._exchange(conn, packed, count)
            except RETRIED:
                await conn.disconnect()
                replies = await self._exchange(conn, packed, count)  # reconnects
        except BaseException:
            await conn.disconnect()  # replies may be left on it: it starts anew
            await self.pool.release(conn)
            raise
        if self._keep and self._kept is None:
            self._kept = conn
        else:
            await self.pool.release(conn)
        return replies

    @staticmethod
    async def _exchange(conn: AbstractConnection, packed: bytes, count: int) -> list[Any]:
        # one deadline for the write and the batch's replies, not a timer per reply; a round
        # trip cut short disconnects the connection (_round_trip)
        try:
            async with asyncio.timeout(conn.socket_timeout):
                await write(conn, packed)
                return await read_replies(conn, count)
        except TimeoutError:
            raise RedisTimeout(f"no reply from redis within {conn.socket_timeout}s") from None

    async def drain(self) -> None:
        """Wait for the calls already queued or in flight (before closing the client), and
        give the kept connection back to the pool."""
        while self._pending or self._sending:
            if self._pending:
                self._flush()
            await asyncio.wait(set(self._sending))
        conn, self._kept = self._kept, None
        if conn is not None:
            await self.pool.release(conn)
