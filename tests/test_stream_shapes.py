"""OpenAIStreamDecoder reads a chunk shaped like the last one it parsed (the same bytes
around a plain content string) without parsing it: whatever the chunks, what it gives the
client and what it reads (content, its length, usage, errors) are what parsing each gives."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from sidecar.errors import UpstreamError
from sidecar.providers import openai_compat
from sidecar.providers.openai_compat import OpenAIStreamDecoder
from sidecar.upstream import HttpChunkStream

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return orjson.dumps({**HEAD, "choices": [choice], **extra})


def texts(*pieces: str, **extra: Any) -> list[bytes]:
    return [chunk({"content": piece}, **extra) for piece in pieces]


USAGE = orjson.dumps({**HEAD, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}})
PLAIN = texts("Hello", " wor", "ld", "", " and more")
STREAMS: dict[str, list[bytes]] = {
    "plain": [chunk({"role": "assistant", "content": ""}), *PLAIN, chunk({}, "stop"), USAGE],
    "unicode": texts("héllo", " 世界", " 🦊", "naïve"),
    "escapes": texts("a", 'say "hi"', "b", "line\nbreak", "c", "back\\slash", "d", "tab\t"),
    "usage-null": texts("a", "b", "c", usage=None),
    "padded": [chunk({"content": p}, obfuscation=o) for p, o in [("a", "x1"), ("bc", "yy2")]]
    + [chunk({"content": "d"}, obfuscation="")],
    "padded-usage-null": [
        chunk({"content": p}, usage=None, obfuscation=o)
        for p, o in [("a", "Zq"), ("b", "k"), ("c", "")]
    ],
    "padding-not-plain": [
        chunk({"content": p}, obfuscation=o) for p, o in [("a", "x"), ("b", 'q"'), ("c", "\\")]
    ],
    "usage-on-content": [
        *texts("a", "b"),
        chunk({"content": "c"}, usage={"prompt_tokens": 1, "completion_tokens": 2}),
    ],
    "x_groq": [
        *texts("a", "b"),
        chunk({}, "stop", x_groq={"usage": {"prompt_tokens": 1, "completion_tokens": 2}}),
    ],
    "tool-calls": [
        *texts("a", "b"),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"content":"x"}'}}]}),
        *texts("c", "d"),
    ],
    "two-choices": [
        *texts("a", "b"),
        orjson.dumps(
            {
                **HEAD,
                "choices": [
                    {"index": 0, "delta": {"content": "c"}},
                    {"index": 1, "delta": {"content": "dd"}},
                ],
            }
        ),
        *texts("e"),
    ],
    "spaced": [
        b'{"choices": [{"delta": {"content": "a"}}]}',
        b'{"choices": [{"delta": {"content": "bb"}}]}',
    ],
    "other-finish": [*texts("a", "b"), chunk({"content": "c"}, "length")],
    "error-after": [*texts("a", "b"), orjson.dumps({"error": {"message": "overloaded"}})],
    "raw-control": [*texts("a", "b"), chunk({"content": "c"}).replace(b'"c"', b'"c\x01"')],
    "raw-quote": [*texts("a", "b"), chunk({"content": "c"}).replace(b'"c"', b'"c"d"')],
    "bad-utf8": [*texts("a", "b"), chunk({"content": "c"}).replace(b'"c"', b'"\xff"')],
    "truncated": [*texts("a", "b"), chunk({"content": "c"})[:-3]],
    "overlap": [*texts("a", "b"), chunk({"content": "c"}).replace(b'c"},', b'"},')[:-1]],
    "glued": [*texts("a", "b"), chunk({"content": "c"}) + b"," + chunk({"content": "d"})],
    "done": [*texts("a", "b"), b"[DONE]", *texts("after")],
}


def run(decoder: OpenAIStreamDecoder, stream: list[bytes]) -> list[Any]:
    """What each chunk gives (or the error it raises), then what the decoder read."""
    given: list[Any] = []
    for data in stream:
        if decoder.finished:
            break
        try:
            given.append(decoder.feed(None, data))
        except UpstreamError as error:
            given.append(("error", error.message))
            break
    return [given, decoder.produced, decoder.content, decoder.usage, decoder.finished]


class Parsing(OpenAIStreamDecoder):
    """The reference: every chunk parsed, one at a time."""

    __slots__ = ()
    take_run = None  # type: ignore[assignment]

    def feed(self, event: str | None, data: bytes) -> list[bytes]:
        self._shape = None
        return super().feed(event, data)


@pytest.mark.parametrize("wants_usage", [False, True], ids=["usage-ours", "usage-asked"])
@pytest.mark.parametrize("keep", [False, True], ids=["counted", "kept"])
@pytest.mark.parametrize("name", list(STREAMS))
def test_a_stream_reads_as_parsing_every_chunk_reads(
    name: str, keep: bool, wants_usage: bool
) -> None:
    stream, extension = STREAMS[name], "x_groq" if name == "x_groq" else None
    assert run(OpenAIStreamDecoder(wants_usage, keep, extension), stream) == run(
        Parsing(wants_usage, keep, extension), stream
    )


@pytest.mark.parametrize("wants_usage", [False, True], ids=["usage-ours", "usage-asked"])
@pytest.mark.parametrize("name", ["plain", "unicode", "usage-null", "padded", "padded-usage-null"])
def test_chunks_of_one_shape_are_read_without_parsing(
    name: str, wants_usage: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[bytes] = []
    loads = orjson.loads

    def counted(data: bytes) -> Any:
        parsed.append(data)
        return loads(data)

    monkeypatch.setattr(openai_compat.orjson, "loads", counted)
    stream = [data for data in STREAMS[name] if data not in (USAGE,)]
    run(OpenAIStreamDecoder(wants_usage), stream)
    content = [data for data in stream if b'"content":"' in data]
    assert len(parsed) <= len(stream) - len(content) + 2  # the role chunk, the first content one


class Pieces:
    """A streamed body: its pieces, then its end."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def __aiter__(self) -> Pieces:
        return self

    async def __anext__(self) -> bytes:
        if not self.pieces:
            raise StopAsyncIteration
        return self.pieces.pop(0)


class Answer:
    def __init__(self, pieces: list[bytes]) -> None:
        self.body = Pieces(pieces)

    def close(self, linger: float = 0.0) -> None:
        pass


def streamed(decoder: OpenAIStreamDecoder, stream: list[bytes], piece_events: int) -> list[Any]:
    """Everything the client gets from `stream` sent as SSE, `piece_events` events a piece,
    and what the decoder read."""
    events = [b"data: " + data + b"\n\n" for data in [*stream, b"[DONE]"]]
    pieces = [
        b"".join(events[at : at + piece_events]) for at in range(0, len(events), piece_events)
    ]
    chunks = HttpChunkStream(Answer(pieces), decoder)  # type: ignore[arg-type]

    async def read() -> list[Any]:
        given: list[bytes] = []
        try:
            async for batch in chunks:
                given += batch
        except UpstreamError as error:
            given.append(error.message.encode())
        return [given, decoder.produced, decoder.content, decoder.usage, chunks.ended]

    return asyncio.run(read())


@pytest.mark.parametrize("piece_events", [1, 2, 3, 100])
@pytest.mark.parametrize("keep", [False, True], ids=["counted", "kept"])
@pytest.mark.parametrize("name", list(STREAMS))
def test_a_burst_of_chunks_reads_as_parsing_each_reads(
    name: str, keep: bool, piece_events: int
) -> None:
    stream, extension = STREAMS[name], "x_groq" if name == "x_groq" else None
    assert streamed(OpenAIStreamDecoder(False, keep, extension), stream, piece_events) == streamed(
        Parsing(False, keep, extension), stream, piece_events
    )


BURSTS = {
    "quote-inside": texts("a", "b", "c", "d").copy(),
    "line-break-in-a-data": texts("a", "b", "c", "d"),
    "one-longer-tail": [*texts("a", "b", "c"), chunk({"content": "d"}, "stop")],
    "overlapping": [*texts("a", "b"), chunk({"content": "c"})[:-2]],
}
BURSTS["quote-inside"][2] = BURSTS["quote-inside"][2].replace(b'"c"', b'"c"x"')


@pytest.mark.parametrize("name", list(BURSTS))
def test_a_burst_with_a_chunk_out_of_shape_reads_as_parsing_each_reads(name: str) -> None:
    stream = BURSTS[name]
    if name == "line-break-in-a-data":  # a data of two lines, joined with a line break
        events = [b"data: " + data + b"\n\n" for data in stream]
        events[2] = events[2].replace(b'"c"', b'"c\ndata: x"')
        raw = [b"".join(events) + b"data: [DONE]\n\n"]
        got = [
            streamed_raw(OpenAIStreamDecoder(False), raw[:]),
            streamed_raw(Parsing(False), raw[:]),
        ]
        assert got[0] == got[1]
        return
    assert streamed(OpenAIStreamDecoder(False), stream, 100) == streamed(
        Parsing(False), stream, 100
    )


def streamed_raw(decoder: OpenAIStreamDecoder, pieces: list[bytes]) -> list[Any]:
    chunks = HttpChunkStream(Answer(pieces), decoder)  # type: ignore[arg-type]

    async def read() -> list[Any]:
        given: list[bytes] = []
        try:
            async for batch in chunks:
                given += batch
        except UpstreamError as error:
            given.append(error.message.encode())
        return [given, decoder.produced, decoder.usage]

    return asyncio.run(read())


def test_a_burst_of_one_shape_is_read_without_a_parse_or_feed_per_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fed: list[bytes] = []
    feed = OpenAIStreamDecoder.feed

    def counted(self: OpenAIStreamDecoder, event: str | None, data: bytes) -> list[bytes]:
        fed.append(data)
        return feed(self, event, data)

    monkeypatch.setattr(OpenAIStreamDecoder, "feed", counted)
    stream = [chunk({"role": "assistant", "content": ""}), *texts(*"abcdefghij"), chunk({}, "stop")]
    given, produced, *_ = streamed(OpenAIStreamDecoder(False), stream, 100)
    assert (given, produced) == (stream, 10)
    # the role chunk, the finish chunk, [DONE]: the content chunks are the role chunk without
    # its role (the shape guessed from it), the first of them too
    assert len(fed) == 3
