"""All network I/O to providers: per-provider timeouts, SSE reading, transport errors.

`HttpProvider` pairs a pure adapter with the process's pooled HTTP/1.1 client
(`sidecar/http1/`), for answers read whole and for streams. Every transport failure leaves
here as an `UpstreamError` with its Outcome decided.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import TypeAlias, TypeVar, cast

from sidecar import sse
from sidecar.errors import Outcome, UpstreamError
from sidecar.http1 import Http1Client, Streamed
from sidecar.providers.base import (
    Adapter,
    ChunkStream,
    Completion,
    EmbeddingsAdapter,
    HttpRequest,
    ResponsesAdapter,
    StreamDecoder,
    StreamParser,
    UpstreamCall,
    Usage,
)
from sidecar.providers.native_embeddings import answered_usage, batches, joined
from sidecar.settings.model import ProviderSettings


def transport_error(exc: BaseException) -> UpstreamError:
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamError(Outcome.UNAVAILABLE, "upstream timed out", reason="timeout")
    detail = str(exc) or type(exc).__name__
    return UpstreamError(
        Outcome.UNAVAILABLE, f"upstream connection failed: {detail}", reason="connect"
    )


R = TypeVar("R")
# signs a built request (a kind whose credentials sign each call: bedrock's SigV4); may raise
# an UpstreamError when it cannot
Authorize: TypeAlias = Callable[[HttpRequest], Awaitable[HttpRequest]]
BATCH_BYTES = 64 * 1024  # of events in one list of chunks: aiohttp's writer drains every 64 KiB
END_WAIT_SECONDS = 1.0  # after the last event, for the rest of the body (see aclose)
EMBED_CONCURRENCY = 4  # calls of one embeddings request in flight at once (batched APIs)
DETAIL_LOG_SECONDS = 60.0  # one log line per provider per minute for its rejections of our key
_KEY_LIKE = re.compile(r"(?:sk|pk|rk)-[\w\-*.\u2026]{4,}|AIza[\w\-]{10,}")

log = logging.getLogger("ringside")


def redact(text: str, secret: str | None) -> str:
    """`text` without the provider key, nor anything shaped like an API key (providers quote
    a masked key in their 401s; a log is no place for even part of one)."""
    if secret:
        text = text.replace(secret, "[REDACTED]")
    return _KEY_LIKE.sub("[REDACTED]", text)


class HttpProvider:
    """A configured provider reached over HTTP."""

    def __init__(
        self,
        settings: ProviderSettings,
        adapter: Adapter,
        http1: Http1Client,
        authorize: Authorize | None = None,
    ) -> None:
        self.settings = settings
        self.adapter = adapter
        self.http1 = http1
        self.authorize = authorize
        # how the adapter's streams are framed: SSE unless it names its own parser
        self.stream_parser: Callable[[], StreamParser] = getattr(
            adapter, "stream_parser", sse.EventParser
        )
        tls = settings.tls
        self.egress = http1.egress(
            settings.proxy,
            tls.context if tls is not None else None,
            tls.files_key if tls is not None else None,
            settings.max_connections,
            settings.timeout.pool,
        )  # built at load: the request path looks its target up there
        self.caps = adapter.caps
        self.native_json_schema = adapter.native_json_schema
        self.json_mode = adapter.json_mode
        self._detail_logged_at = -DETAIL_LOG_SECONDS
        self._details_unlogged = 0

    async def complete(self, call: UpstreamCall) -> Completion:
        response = await self._send(self.http1.request, call)
        body, status, headers = response.body, response.status, response.headers
        if not 200 <= status < 300:
            raise self._failure(status, body, headers)
        return self.adapter.parse_response(body, call)

    def _failure(self, status: int, body: bytes, headers: Mapping[str, str]) -> Exception:
        """The adapter's classification; what the client may not see goes to the log, at
        most once a minute per provider (a wrong key fails every request)."""
        error = self.adapter.classify_error(status, body, headers)
        detail = getattr(error, "detail", None)
        if detail:
            now = time.monotonic()
            if now - self._detail_logged_at < DETAIL_LOG_SECONDS:
                self._details_unlogged += 1
            else:
                more = self._details_unlogged
                self._detail_logged_at, self._details_unlogged = now, 0
                log.warning(
                    "provider %s rejected the gateway's credentials (HTTP %d): %s%s",
                    self.settings.name, status, redact(detail, self.settings.api_key),
                    f" ({more} more since the last such line)" if more else "",
                )  # fmt: skip
        return error

    async def embed(self, call: UpstreamCall) -> Completion:
        """The embeddings answer; an API that takes fewer inputs per call than the request
        has (its adapter's `embeddings_batch`) is sent one call per batch, at most
        EMBED_CONCURRENCY at a time, every request built (and any refused) before the first
        is sent; the first failure fails the whole and cancels the calls still running."""
        adapter = cast(EmbeddingsAdapter, self.adapter)  # caps.embeddings: checked by the cascade
        batch = getattr(adapter, "embeddings_batch", None)
        bodies = batches(call.body, batch(call.model_id)) if batch is not None else [call.body]
        calls = [call] if len(bodies) == 1 else [replace(call, body=body) for body in bodies]
        requests = [adapter.build_embeddings_request(each) for each in calls]
        if len(calls) == 1:
            return await self._embed_once(adapter, call, requests[0])
        gate = asyncio.Semaphore(EMBED_CONCURRENCY)

        async def one(each: UpstreamCall, request: HttpRequest) -> Completion:
            async with gate:
                return await self._embed_once(adapter, each, request)

        pairs = zip(calls, requests, strict=True)
        tasks = [asyncio.ensure_future(one(each, request)) for each, request in pairs]
        for task in tasks:  # a second failure, after the first has been raised, is not logged
            task.add_done_callback(_retrieved)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
        for task in tasks:
            failure = task.exception() if task.done() and not task.cancelled() else None
            if failure is not None:
                if isinstance(failure, UpstreamError):  # the batches answered are billed
                    failure.usage = answered_usage(
                        (each.body, done.result())
                        for each, done in zip(calls, tasks, strict=True)
                        if done.done() and not done.cancelled() and done.exception() is None
                    )
                raise failure
        return joined([task.result() for task in tasks])

    async def _embed_once(
        self, adapter: EmbeddingsAdapter, call: UpstreamCall, request: HttpRequest
    ) -> Completion:
        response = await self._send(self.http1.request, call, request)
        body, status, headers = response.body, response.status, response.headers
        if not 200 <= status < 300:
            raise self._failure(status, body, headers)
        return adapter.parse_embeddings_response(body, call, headers)

    async def respond(self, call: UpstreamCall) -> Completion:
        """A Responses API request to a kind that has it natively (`caps.responses`: checked
        by the cascade), read whole: a call made for a streamed request the schema loop
        buffers asks for no stream."""
        adapter = cast(ResponsesAdapter, self.adapter)
        request = adapter.build_responses_request(replace(call, stream=False))
        response = await self._send(self.http1.request, call, request)
        if not 200 <= response.status < 300:
            raise self._failure(response.status, response.body, response.headers)
        return adapter.parse_responses_response(response.body, call)

    async def open_response_stream(self, call: UpstreamCall) -> ChunkStream:
        """A streamed Responses API request to a kind that has it natively: its events."""
        adapter = cast(ResponsesAdapter, self.adapter)
        request = adapter.build_responses_request(call)
        return await self._open(call, request, adapter.responses_stream_decoder)

    async def open_stream(self, call: UpstreamCall) -> ChunkStream:
        """Open the stream; an upstream failure before the first byte raises here."""
        return await self._open(call, None, self.adapter.stream_decoder)

    async def _open(
        self,
        call: UpstreamCall,
        request: HttpRequest | None,
        decoder: Callable[[UpstreamCall], StreamDecoder],
    ) -> ChunkStream:
        response = await self._send(self.http1.stream, call, request)
        if not 200 <= response.status < 300:
            try:
                body = await response.body.read()
            except (TimeoutError, OSError):
                body = b""
            finally:
                response.close()
            raise self._failure(response.status, body, response.headers)
        return HttpChunkStream(response, decoder(call), self.stream_parser())

    async def _send(
        self,
        send: Callable[..., Awaitable[R]],
        call: UpstreamCall,
        request: HttpRequest | None = None,
    ) -> R:
        """The adapter's request through `send` (whole or streamed), with this provider's
        timeouts; a transport failure leaves as an UpstreamError."""
        if request is None:
            request = self.adapter.build_request(call)
        if self.authorize is not None:
            request = await self.authorize(request)
        timeouts = self.settings.timeout
        try:
            return await send(
                self.egress.target(request.url),
                request.headers,
                request.body,
                timeouts.connect,
                timeouts.read,
                timeouts.total,
                request.method,
            )
        except (TimeoutError, OSError) as exc:
            raise transport_error(exc) from None


# reads the whole events of piece[pos:end] into a list of Framed, returns where it stopped
Frame: TypeAlias = Callable[[bytes, int, int, list[bytes]], int]


def _retrieved(task: asyncio.Future[Completion]) -> None:
    if not task.cancelled():
        task.exception()


class HttpChunkStream:
    """Iterates an upstream stream (SSE, or the framing its adapter's parser reads) as lists
    of OpenAI chunk bytes.

    Each list holds every chunk of the events that have arrived (up to BATCH_BYTES of them:
    the rest waits, as the events it came in), so a burst of events costs one write to the
    client, not one per event; no list waits for an event that has not arrived (time to
    first token). An error event after some chunks is raised on the call after the one
    that returns them."""

    def __init__(
        self, response: Streamed, decoder: StreamDecoder, parser: StreamParser | None = None
    ) -> None:
        self.response = response
        self.decoder = decoder
        self._parser = parser if parser is not None else sse.EventParser()
        self._events: deque[sse.Event] = deque()
        self._failure: UpstreamError | None = None
        # a decoder that can read a run of its events at once (OpenAI's chunks)
        self._take_run: Callable[[deque[sse.Event]], list[bytes] | None] | None = getattr(
            decoder, "take_run", None
        )
        self.framed = False  # hands out sse.Framed events (frame_events)
        self._frame: Frame | None = None
        self._rest = b""  # what is left of a piece read, past BATCH_BYTES (framed)

    @property
    def usage(self) -> Usage | None:
        return self.decoder.usage

    @property
    def content(self) -> str:
        return self.decoder.content

    @property
    def produced(self) -> int:
        return self.decoder.produced

    @property
    def ended(self) -> bool:
        """Whether every chunk has been handed out: the upstream's last event has been read."""
        return self.decoder.finished and self._failure is None

    def frame_events(self) -> None:
        """From now on, hand out lists of sse.Framed events, for the caller to send as they
        are: with a decoder that reads a piece's events in place (OpenAI's `frame`), the
        upstream's bytes go out as they came wherever nothing in them changes (a usage
        chunk the client did not ask for, `[DONE]`, a re-encoded chunk are cut out)."""
        self.framed = True
        if isinstance(self._parser, sse.EventParser):  # (what `frame` leaves over is SSE)
            self._frame = getattr(self.decoder, "frame", None)

    def __aiter__(self) -> HttpChunkStream:
        return self

    async def __anext__(self) -> list[bytes]:
        if self._failure is not None:
            raise self._failure
        if self.framed:
            return await self._next_framed()
        decoder, events = self.decoder, self._events
        out: list[bytes] = []
        batched = 0
        take_run = self._take_run
        while True:
            while events and not decoder.finished:
                if take_run is not None and len(events) > 1:
                    run = take_run(events)
                    if run:
                        out += run
                        batched += sum(map(len, run))
                        if batched >= BATCH_BYTES:
                            return out
                        continue
                    if run is None:
                        take_run = None  # one at a time for the rest of this batch
                event, data = events.popleft()
                try:
                    chunks = decoder.feed(event, data)
                except UpstreamError as error:
                    if not out:
                        raise
                    self._failure = error  # after the chunks before it are out
                    return out
                if chunks:
                    out += chunks
                    batched += len(data)
                    if batched >= BATCH_BYTES:
                        return out
            if out:
                return out
            if decoder.finished:
                raise StopAsyncIteration
            await self._read_events()

    async def _read_events(self) -> None:
        try:
            piece = await self.response.body.__anext__()
        except StopAsyncIteration:
            self._ended()
        except (TimeoutError, OSError) as exc:
            raise transport_error(exc) from None
        else:
            self._parse(piece)

    async def _read_piece(self) -> bytes | None:
        """The body's next piece; None at its end, the parser's last events queued."""
        try:
            return await self.response.body.__anext__()
        except StopAsyncIteration:
            self._ended()
            return None
        except (TimeoutError, OSError) as exc:
            raise transport_error(exc) from None

    def _ended(self) -> None:
        """The body ended: the parser's last events queued; none left ends the iteration,
        or is a failure when the stream gave nothing at all."""
        self._parse(None)
        if not self._events:
            if self.decoder.usage is None and not self.decoder.produced:
                raise UpstreamError(
                    Outcome.UNAVAILABLE, "upstream closed the stream early", reason="bad_body"
                ) from None
            raise StopAsyncIteration

    def _parse(self, piece: bytes | None) -> None:
        """Queue the events `piece` completes (None: the body's end)."""
        parser = self._parser
        try:
            self._events.extend(parser.feed(piece) if piece is not None else parser.end())
        except sse.LineTooLong as exc:
            raise UpstreamError(Outcome.UNAVAILABLE, str(exc), reason="bad_body") from None

    async def _next_framed(self) -> list[bytes]:
        """`__anext__` when framed: the Framed events of the next piece that gives any."""
        out: list[bytes] = []
        try:
            while not out:
                if self._events and not self.decoder.finished:
                    self._feed_queued(out)
                    continue
                if self.decoder.finished:
                    raise StopAsyncIteration
                piece = self._rest or await self._read_piece()
                if piece is not None:
                    self._take(self._batch(piece), out)
        except UpstreamError as error:
            if not out:
                raise
            self._failure = error  # after the events before it are out
        return out

    def _batch(self, piece: bytes) -> bytes:
        """Up to BATCH_BYTES of `piece`, cut after an event (the rest is the next call's):
        what a write waiting for a slow client holds is bounded as the chunk lists are."""
        self._rest = b""
        if len(piece) > BATCH_BYTES:
            cut = piece.rfind(b"\n\n", 0, BATCH_BYTES) + 2
            if cut > 1:
                self._rest = piece[cut:]
                return piece[:cut]
        return piece

    def _take(self, piece: bytes, out: list[bytes]) -> None:
        """A piece's Framed events into `out`: its whole events in OpenAI's form read in place
        by the decoder, what is not in that form (a line cut between two pieces, CRLF, a
        comment) through the SSE parser."""
        frame, parser = self._frame, self._parser
        if frame is None or not isinstance(parser, sse.EventParser):
            self._parse(piece)
            self._feed_queued(out)
            return
        if not parser.idle:  # an event began in an earlier piece: the parser ends it
            cut = piece.find(b"\n\n")
            if cut < 0:
                self._parse(piece)
                return
            self._parse(piece[: cut + 2])
            self._feed_queued(out)
            piece = piece[cut + 2 :]
        whole = parser.whole(piece) if not self.decoder.finished else 0
        if whole:
            at = frame(piece, 0, whole, out)
            if self.decoder.finished:
                return
            piece = piece[at:]
        if piece:
            self._parse(piece)
            self._feed_queued(out)

    def _feed_queued(self, out: list[bytes]) -> None:
        """The queued events through the decoder, their chunks into `out` as one Framed."""
        events, decoder = self._events, self.decoder
        chunks: list[bytes] = []
        try:
            while events and not decoder.finished:
                event, data = events.popleft()
                chunks += decoder.feed(event, data)
        finally:  # (an error event raises: the chunks before it are out)
            if chunks:
                out.append(sse.Framed(sse.encode_all(chunks)))
        if decoder.finished:
            events.clear()

    async def aclose(self) -> None:
        """Give the connection back, or drop it: an unfinished upstream generation is
        cancelled with it. After the last event the body's end may still be on its way."""
        self.response.close(END_WAIT_SECONDS if self.decoder.finished else 0.0)
