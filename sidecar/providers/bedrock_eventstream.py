"""AWS event-stream framing (`application/vnd.amazon.eventstream`) → (event name, payload).

ConverseStream answers in binary messages (prelude, headers, payload, CRC32s), not SSE.
`EventStreamParser` has the shape of `sidecar.sse.EventParser` (`feed` a body piece, `end`),
so `sidecar.upstream` reads either through one path; decoding and the CRC checks are botocore's
`EventStreamBuffer` (imported when the first stream opens: botocore is the `bedrock` extra).

What it yields, per message type (its `:message-type` header):
- `event`: (`:event-type`, payload), e.g. ("contentBlockDelta", b'{"delta": ...}');
- `exception`: ("exception:" + `:exception-type`, payload), e.g. a `throttlingException`
  raised mid-stream;
- `error`: ("error:" + `:error-code`, `:error-message` as UTF-8).
A frame whose CRC does not match, or that is over botocore's size bounds, ends the stream as an
unparseable upstream body.
"""

from __future__ import annotations

from typing import Any

from sidecar.errors import UpstreamError
from sidecar.providers.openai_compat import bad_body

Event = tuple[str | None, bytes]


class EventStreamParser:
    __slots__ = ("_buffer", "_errors")

    def __init__(self) -> None:
        from botocore.eventstream import EventStreamBuffer, ParserError

        self._buffer: Any = EventStreamBuffer()
        self._errors: type[Exception] = ParserError

    def feed(self, piece: bytes) -> list[Event]:
        self._buffer.add_data(piece)
        events: list[Event] = []
        try:
            for message in self._buffer:
                events.append(_event(message.headers, message.payload))
        except self._errors as exc:
            raise _broken(exc) from None
        return events

    def end(self) -> list[Event]:
        """Nothing is left to decode when the body ends: a partial frame is a cut stream,
        which the decoder sees as a stream that did not finish."""
        return []


def _event(headers: dict[str, Any], payload: bytes) -> Event:
    kind = headers.get(":message-type", "event")
    if kind == "event":
        return str(headers.get(":event-type") or ""), payload
    if kind == "exception":
        return f"exception:{headers.get(':exception-type') or 'unknown'}", payload
    message = headers.get(":error-message") or ""
    return f"error:{headers.get(':error-code') or 'unknown'}", str(message).encode()


def _broken(exc: Exception) -> UpstreamError:
    return bad_body(f"a broken event-stream frame ({type(exc).__name__}: {exc})")
