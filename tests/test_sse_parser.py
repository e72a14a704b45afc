"""Decoding an upstream's event stream (sidecar/sse.py) as the WHATWG event-stream format says:
lines end with CRLF, LF or a lone CR, one UTF-8 BOM may open the stream; cut anywhere."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sidecar.sse import Event, EventParser, encode, encode_all
from tests.conftest import openai_config
from tests.procs import SidecarProcess
from tests.support import post_chat
from tests.test_upstream_wire import SSE, STREAM_PIECES, serve, stream_handler, streamed_content
from tests.test_upstream_wire import stream_request as chat_stream_request

BOM = b"\xef\xbb\xbf"
STREAM = (
    b": a comment\n"
    b'event: greeting\ndata: {"a": 1}\n\n'
    b"id: 7\nretry: 100\ndata: first line\ndata:second line\n\n"
    b"data: [DONE]\n\n"
)
EVENTS: list[Event] = [
    ("greeting", b'{"a": 1}'),
    (None, b"first line\nsecond line"),
    (None, b"[DONE]"),
]


def decoded(stream: bytes, piece_bytes: int) -> list[Event]:
    parser = EventParser()
    events: list[Event] = []
    for at in range(0, len(stream), piece_bytes):
        events += parser.feed(stream[at : at + piece_bytes])
    return events + parser.end()


def with_line_ends(stream: bytes, end: bytes) -> bytes:
    return stream.replace(b"\n", end)


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("piece_bytes", [1, 2, 3, 5, 8, 13, 4096])
def test_every_line_ending_gives_the_same_events(end: bytes, piece_bytes: int) -> None:
    assert decoded(with_line_ends(STREAM, end), piece_bytes) == EVENTS


@pytest.mark.parametrize("piece_bytes", [1, 2, 3, 5, 4096])
def test_line_endings_mixed_in_one_stream_give_the_same_events(piece_bytes: int) -> None:
    mixed = (
        b": a comment\r"
        b'event: greeting\r\ndata: {"a": 1}\n\r'
        b"id: 7\rretry: 100\ndata: first line\r\ndata:second line\r\r\n"
        b"data: [DONE]\r\r"
    )
    assert decoded(mixed, piece_bytes) == EVENTS


def test_a_data_line_without_a_colon_is_an_empty_data_line() -> None:
    assert decoded(b"data\n\ndata\ndata: x\n\n", 1) == [(None, b""), (None, b"\nx")]


def test_a_crlf_cut_between_two_pieces_is_one_line_end() -> None:
    parser = EventParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r") == []  # no blank line between the CR and the LF
    assert parser.feed(b"\n\r") == [(None, b"a\nb")]
    assert parser.feed(b"\n") == []


def test_a_lone_cr_at_the_end_of_a_piece_ends_the_line() -> None:
    parser = EventParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\r") == [(None, b"a")]
    assert parser.feed(b"data: b\r\r") == [(None, b"b")]


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("piece_bytes", [1, 2, 3, 4096])
def test_a_leading_bom_is_ignored(end: bytes, piece_bytes: int) -> None:
    """Even when the first line is a field: with the BOM it would be no field at all."""
    stream = b"data: opening\n\n" + STREAM
    assert decoded(BOM + with_line_ends(stream, end), piece_bytes) == [(None, b"opening"), *EVENTS]


def test_only_the_first_bom_is_ignored() -> None:
    """A second BOM belongs to the first line: `\\ufeffdata` is no field the stream knows."""
    assert decoded(BOM + BOM + b"data: lost\n\ndata: kept\n\n", 4096) == [(None, b"kept")]


def test_a_bom_later_in_the_stream_is_data() -> None:
    assert decoded(b"data: a\n\ndata: " + BOM + b"b\n\n", 2) == [
        (None, b"a"),
        (None, BOM + b"b"),
    ]


def test_a_start_that_looks_like_a_bom_but_is_not_one_is_kept() -> None:
    parser = EventParser()
    assert parser.feed(b"\xef") == []
    assert parser.feed(b"\xbb") == []
    assert parser.feed(b"x\ndata: y\n\n") == [(None, b"y")]


def test_a_stream_of_only_a_bom_has_no_events() -> None:
    parser = EventParser()
    assert parser.feed(BOM[:2]) == []
    assert parser.end() == []


WHOLE_EVENTS = (
    b'data: {"a": 1}\n\n'
    b"data:  two spaces: one is kept\n\n"
    b"data: \n\n"
    b"data: " + BOM + b"not at the start\n\n"
    b"data: [DONE]\n\n"
)


@pytest.mark.parametrize("start", [b"", b'data: {"b": 2}\n\n'], ids=["first", "later"])
def test_a_piece_of_whole_one_line_events_gives_what_a_line_at_a_time_gives(start: bytes) -> None:
    """Such a piece (how OpenAI-style servers write) is split at once: the same events."""
    parser = EventParser()
    assert parser.feed(start) + parser.feed(WHOLE_EVENTS) == decoded(start + WHOLE_EVENTS, 1)


@pytest.mark.parametrize(
    "later",
    [b"data: y\n\n", b"data: y\ndata: z\n\n", b"data: y\n\n\n", b"data: y\r\n\r\n"],
    ids=["one-line", "two-lines", "blank-line", "crlf"],
)
def test_what_an_earlier_piece_left_pending_belongs_to_the_next_events(later: bytes) -> None:
    """An event name, data lines or a line cut off before the piece are its events' too."""
    for earlier in (b"event: named\n", b"data: x\n", b"data: x", b"data: x\r"):
        parser = EventParser()
        events = parser.feed(earlier) + parser.feed(later) + parser.end()
        assert events == decoded(earlier + later, 1), (earlier, later)


@pytest.mark.parametrize(
    "chunks",
    [[b'{"a":1}', b'{"b":2}'], [b"one"], [], [b'{"a":1}', b"two\nlines", b""], [b"x\r\ny"]],
)
def test_chunks_encoded_together_are_each_chunk_encoded(chunks: list[bytes]) -> None:
    assert encode_all(chunks) == b"".join(encode(chunk) for chunk in chunks)


# -- through a real sidecar ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "shaped",
    [
        with_line_ends(SSE, b"\r"),
        BOM + SSE,
        BOM + with_line_ends(SSE, b"\r"),
    ],
    ids=["cr", "bom", "bom-cr"],
)
@pytest.mark.parametrize("piece_bytes", [7, 4096])
def test_an_upstream_stream_with_cr_line_ends_or_a_bom_arrives_whole(
    shaped: bytes, piece_bytes: int, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    for url in serve(stream_handler(shaped, piece_bytes)):
        proc = sidecar_factory(openai_config(url))
        answer = post_chat(proc, chat_stream_request())
        assert streamed_content(answer) == "".join(STREAM_PIECES)
