"""Server-sent events: decoding an upstream stream and encoding ours."""

from __future__ import annotations

DONE = b"data: [DONE]\n\n"
MAX_LINE_BYTES = 16 * 1024 * 1024  # one event can be large (a long tool-call argument)

Event = tuple[str | None, bytes]  # (event name, data)


def encode(data: bytes) -> bytes:
    if b"\n" in data:  # data passed through from a multi-line event: one data line per line
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\ndata: ")
    return b"data: " + data + b"\n\n"


class Framed(bytes):
    """Events already in SSE form (`data: <chunk>\n\n` each): what a stream hands out when
    asked for its events framed (HttpChunkStream.frame_events), most often the upstream's
    own bytes, passed on as they came. A list of them is sent joined (`encode_all`)."""

    __slots__ = ()


def unframe(events: bytes) -> list[bytes]:
    """The data of each event of `events` (Framed: one data line per event)."""
    return events[6:-2].split(b"\n\ndata: ") if events else []


def encode_all(chunks: list[bytes]) -> bytes:
    """`encode` of each chunk, joined: one join when no chunk holds a line break (a
    stream's chunks, nearly always). A list of Framed events is only joined."""
    if chunks and type(chunks[0]) is Framed:
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    joined = b"\n\ndata: ".join(chunks)
    if joined.count(b"\n") != 2 * len(chunks) - 2:
        return b"".join(encode(chunk) for chunk in chunks)
    return b"data: " + joined + b"\n\n"


class LineTooLong(ValueError):
    """An SSE line over MAX_LINE_BYTES: a broken upstream, not a big answer."""


BOM = b"\xef\xbb\xbf"


class EventParser:
    """Incremental SSE decoding: `feed` the body's pieces as they arrive, get back the events
    they complete. As the WHATWG event-stream format says: a line ends with CRLF, LF or a lone
    CR (a CRLF cut between two pieces is one line end), and one UTF-8 BOM at the start of the
    stream is ignored. Comments, ids and retry fields carry nothing we forward and are dropped;
    multi-line data is joined with newlines. Synchronous, so one piece holding many events
    is decoded in one go."""

    __slots__ = ("_after_cr", "_data", "_event", "_started", "_tail", "_tail_bytes")

    def __init__(self) -> None:
        self._tail: list[bytes] = []  # a line not ended yet, in the pieces it came in
        self._tail_bytes = 0
        self._event: str | None = None
        self._data: list[bytes] = []
        self._started = False  # past the place where a BOM may stand
        self._after_cr = False  # the last piece ended with CR: a LF starting the next is its pair

    def whole(self, piece: bytes) -> int:
        """How many leading bytes of `piece` are whole events in the form OpenAI-style
        servers write them (`data: <one line>\n\n`, LF line ends), to be read without this
        parser: 0 unless nothing is pending here and the piece starts with such an event
        (the caller checks that each of its data holds no line break). The rest, if any,
        is `feed`'s."""
        if (
            self._tail
            or self._data
            or self._event is not None
            or self._after_cr
            or not piece.startswith(b"data: ")
            or b"\r" in piece
        ):
            return 0
        end = piece.rfind(b"\n\n")
        if end < 0:
            return 0
        self._started = True  # (a piece starting with `data: ` does not start with a BOM)
        return end + 2

    @property
    def idle(self) -> bool:
        """Nothing is pending: the next byte starts a line of a new event."""
        return not (self._tail or self._data or self._after_cr) and self._event is None

    def feed(self, piece: bytes) -> list[Event]:
        if (
            piece.startswith(b"data: ")
            and piece.endswith(b"\n\n")
            and not self._tail
            and not self._data
            and self._event is None
            and not self._after_cr
            and b"\r" not in piece
        ):
            # whole events of one data line each, the way OpenAI-style servers write them:
            # split at once (nothing is pending, and the piece cannot start with a BOM)
            datas = piece[6:-2].split(b"\n\ndata: ")
            if piece.count(b"\n") == 2 * len(datas):
                self._started = True
                return [(None, data) for data in datas]
        if not self._started:
            piece = self._skip_bom(piece)
        if self._after_cr:
            if not piece:
                return []
            self._after_cr = False
            if piece[0] == 0x0A:  # b"\n"
                piece = piece[1:]
        if b"\r" in piece:  # CRLF or lone CR line ends: made LF, the one the split below knows
            self._after_cr = piece[-1] == 0x0D
            piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n" not in piece:
            self._keep(piece)
            return []
        if self._tail:
            piece = b"".join(self._tail) + piece
            self._tail.clear()
            self._tail_bytes = 0
        lines = piece.split(b"\n")
        self._keep(lines.pop())
        return self._lines(lines)

    def end(self) -> list[Event]:
        """The events left when the body ends: a last line or event without its ending."""
        lines = [b"".join(self._tail), b""]
        self._tail.clear()
        self._tail_bytes = 0
        return self._lines(lines)

    def _skip_bom(self, piece: bytes) -> bytes:
        """`piece` without the stream's leading BOM; a start that may still become one waits."""
        start = b"".join(self._tail) + piece if self._tail else piece
        if len(start) < len(BOM) and BOM.startswith(start):
            if piece:
                self._tail.append(piece)
                self._tail_bytes += len(piece)
            return b""
        self._started = True
        self._tail.clear()
        self._tail_bytes = 0
        return start.removeprefix(BOM)

    def _keep(self, partial: bytes) -> None:
        if partial:
            self._tail.append(partial)
            self._tail_bytes += len(partial)
            if self._tail_bytes > MAX_LINE_BYTES:
                raise LineTooLong(f"upstream sent a stream line over {MAX_LINE_BYTES} bytes")

    def _lines(self, lines: list[bytes]) -> list[Event]:
        events: list[Event] = []
        event, data = self._event, self._data
        for line in lines:
            if not line:
                if data:
                    events.append((event, data[0] if len(data) == 1 else b"\n".join(data)))
                    data = []
                event = None
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
            elif line.startswith(b"event:"):
                event = line[6:].strip().decode("utf-8", "replace")
            elif line == b"data":  # a field without a colon has the empty value
                data.append(b"")
        self._event, self._data = event, data
        return events
