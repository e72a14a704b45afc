"""One redis connection whose script calls leave at once, in order: the budget leases' line.

A leased request's settle must reach the kernel before its answer leaves (a `kill -9` after
the answer then cannot lose it: the kernel still sends a closed socket's buffered bytes), and
a lease's settles must reach redis before the lease is grown or given back. So `send` packs
the call and writes it to the socket in the same step (no event-loop turn, no queue of ours),
and every call of the leases goes through this one connection: redis runs them in the order
they were written. Replies are read behind, in order, by one task; a call's future holds its
reply. `send` reports whether the bytes are all in the kernel (an asyncio transport keeps
what the socket did not take: then `flushed()` waits for them).

When the connection fails (a write, a reply, or no reply within `timeout`) every call written
and not answered fails with the error, and the line is down until `connect` opens it again;
the owner decides what each failed call becomes (a journaled settle, a lease given back).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from redis._parsers.hiredis import NOT_ENOUGH_DATA
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeout

from sidecar.stores.redis_batch import PUSH, READ_SIZE, _packed, wire


class LineDown(RedisConnectionError):
    """The line has no connection (it failed, or was never opened)."""


# a call written: its reply count (2 with a SCRIPT LOAD), script, keys, args, future, resent
Sent = tuple[int, str, Sequence[Any], Sequence[Any], "asyncio.Future[Any]", bool]


class ScriptLine:
    def __init__(self, client: Redis, scripts: Mapping[str, AsyncScript], timeout: float) -> None:
        self.pool = client.connection_pool
        self.scripts = dict(scripts)
        self.timeout = timeout  # seconds the oldest unanswered call may wait for its reply
        self._conn: AbstractConnection | None = None
        self.writer: asyncio.StreamWriter | None = None  # None: the line is down
        self._loaded: set[str] = set()
        self._waiting: deque[Sent] = deque()  # calls written, replies to read
        self._deadline: asyncio.Timeout | None = None  # the reader's read under way
        self._reader: asyncio.Task[None] | None = None
        self._connecting: asyncio.Future[None] | None = None

    async def connect(self) -> None:
        """Open the line (one caller connects, the others wait for it); raises when redis
        cannot be reached."""
        if self.writer is not None:
            return
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> None:
        conn = await self.pool.get_connection()
        try:
            await conn.connect()
        except BaseException:
            await self.pool.release(conn)
            raise
        self._conn, self.writer, self._loaded = conn, conn._writer, set()
        self._reader = asyncio.ensure_future(self._read(conn))

    def send(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Write one script call now; its future holds the reply (or the line's failure)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._write(name, keys, args, future, False)
        return future

    def _write(
        self,
        name: str,
        keys: Sequence[Any],
        args: Sequence[Any],
        future: asyncio.Future[Any],
        resent: bool,
    ) -> None:
        writer = self.writer
        if writer is None:
            future.set_exception(LineDown("the budget lease line to redis is not connected"))
            return
        script = self.scripts[name]
        packed = _packed("EVALSHA", script.sha, len(keys), *keys, *args)
        replies = 1
        if name not in self._loaded:  # its first call carries the SCRIPT LOAD, in one write
            packed = _packed("SCRIPT", "LOAD", script.script) + packed
            self._loaded.add(name)
            replies = 2
        try:
            writer.write(packed)
        except Exception as exc:  # the transport is closing: the line is down
            future.set_exception(RedisConnectionError(f"writing to redis failed: {exc}"))
            self._fail(future.exception() or exc)
            return
        self._waiting.append((replies, name, keys, args, future, resent))
        deadline = self._deadline
        if deadline is not None and deadline.when() is None:  # the reader waits with no limit
            deadline.reschedule(asyncio.get_running_loop().time() + self.timeout)

    def pending(self) -> int:
        """Bytes written but not yet taken by the kernel (0: all of them left this process)."""
        writer = self.writer
        return 0 if writer is None else writer.transport.get_write_buffer_size()

    async def flushed(self) -> None:
        """Wait until the kernel has every byte written so far."""
        writer = self.writer
        if writer is not None:
            with contextlib.suppress(Exception):
                await writer.drain()

    async def _read(self, conn: AbstractConnection) -> None:
        waiting = self._waiting
        found = wire(conn)
        try:
            if found is None:
                raise RedisConnectionError("the budget lease line needs redis-py's hiredis parser")
            reader, stream = found
            skip = 0  # replies of the head call still to read before its own (its SCRIPT LOAD)
            while True:
                reply = reader.gets()
                if reply is NOT_ENOUGH_DATA:
                    # always reading, so a connection redis closes is seen while idle; a
                    # reply is waited for `timeout` at most (send sets the limit of an idle read)
                    async with asyncio.timeout(self.timeout if waiting else None) as deadline:
                        self._deadline = deadline
                        try:
                            data = await stream.read(READ_SIZE)
                        finally:
                            self._deadline = None
                    if not data:
                        raise RedisConnectionError("redis closed the connection")
                    reader.feed(data)
                    continue
                if isinstance(reply, RedisConnectionError):
                    raise reply
                if PUSH is not None and isinstance(reply, PUSH):
                    continue
                if not skip:
                    skip = waiting[0][0]
                skip -= 1
                if skip:
                    continue  # a SCRIPT LOAD's reply
                self._answer(waiting.popleft(), reply)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            self._fail(RedisTimeout(f"no reply from redis within {self.timeout}s"))
        except Exception as exc:
            self._fail(exc if isinstance(exc, RedisConnectionError) else
                       RedisConnectionError(f"reading from redis failed: {exc}"))  # fmt: skip

    def _answer(self, sent: Sent, reply: Any) -> None:
        _, name, keys, args, future, resent = sent
        if future.done():
            return
        if isinstance(reply, NoScriptError) and not resent:
            # the server lost its scripts (a restart, a flush): written again, with its SCRIPT
            # LOAD, after what is already on the way (settles commute: each takes what this
            # process left on its lease)
            self._loaded.discard(name)
            self._write(name, keys, args, future, True)
        elif isinstance(reply, Exception):
            future.set_exception(reply)
        else:
            future.set_result(reply)

    def _fail(self, exc: BaseException) -> None:
        """The connection is lost: every unanswered call fails with `exc`."""
        conn, self._conn, self.writer = self._conn, None, None
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        waiting, self._waiting = self._waiting, deque()
        for sent in waiting:
            if not sent[4].done():
                sent[4].set_exception(exc)
        if conn is not None:
            task = asyncio.ensure_future(self._drop(conn))
            task.add_done_callback(lambda done: done.exception())

    async def _drop(self, conn: AbstractConnection) -> None:
        await conn.disconnect()
        await self.pool.release(conn)

    async def close(self) -> None:
        """Wait for the replies of what was written (up to `timeout`), then close the line."""
        if self._waiting:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    asyncio.gather(*(sent[4] for sent in self._waiting), return_exceptions=True),
                    self.timeout,
                )
        conn, self._conn, self.writer = self._conn, None, None
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
            self._reader = None
        for sent in self._waiting:
            if not sent[4].done():
                sent[4].set_exception(LineDown("the budget lease line was closed"))
        self._waiting.clear()
        if conn is not None:
            await self._drop(conn)
