"""A chat stream hands out its events framed (HttpChunkStream.frame_events): the upstream's
own bytes wherever nothing in them changes. Whatever the chunks and however the body is cut
into pieces, the client gets byte for byte what parsing every chunk and encoding it gives,
and the decoder reads the same content, length, usage and end."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from sidecar import sse
from sidecar.errors import UpstreamError
from sidecar.providers.openai_compat import OpenAIStreamDecoder
from sidecar.upstream import BATCH_BYTES, HttpChunkStream
from tests.test_stream_shapes import HEAD, STREAMS, USAGE, Answer, Parsing, chunk, texts

ROLE = chunk({"role": "assistant", "content": ""})
CHANGED = {**HEAD, "model": "m-2"}
FRAMED_STREAMS: dict[str, list[bytes]] = {
    **STREAMS,
    # the bench upstream's and vLLM's: a content chunk is the role chunk without its role
    "role-then-run": [ROLE, *texts(*(f"tok{i} " for i in range(20))), chunk({}, "stop"), USAGE],
    # the guess from the role chunk is wrong: the content chunks carry a field it has not
    "role-guess-wrong": [ROLE, *texts("a", "b", "c", system_fingerprint="fp"), chunk({}, "stop")],
    # the shape changes mid-stream: a run of the old shape, then chunks of another model
    "shape-changes": [
        ROLE,
        *texts("a", "b", "c", "d"),
        *(
            orjson.dumps({**CHANGED, "choices": [{"index": 0, "delta": {"content": p}}]})
            for p in ("e", "f", "g", "h")
        ),
        *texts("i", "j"),
        chunk({}, "stop"),
        USAGE,
    ],
    "quote-mid-run": [ROLE, *texts("a", "b", 'c"', "d", "e", "f"), chunk({}, "stop")],
    "usage-null-every-chunk": [ROLE, *texts("a", "b", "c", usage=None), USAGE],
    "error-mid-run": [
        ROLE,
        *texts("a", "b", "c"),
        orjson.dumps({"error": {"message": "overloaded"}}),
        *texts("d", "e"),
    ],
    "empty-content-in-run": [ROLE, *texts("a", "", "b", "", "c"), chunk({}, "stop")],
    "non-ascii-run": [ROLE, *texts("é", "世", "🦊", "a"), chunk({}, "stop")],
    "control-in-run": [ROLE, *texts("a", "b\u2028", "c"), chunk({}, "stop")],
}


def body(stream: list[bytes]) -> bytes:
    return b"".join(b"data: " + data + b"\n\n" for data in [*stream, b"[DONE]"])


def cut(raw: bytes, how: str) -> list[bytes]:
    """`raw` in pieces: `events:N` N events a piece, `bytes:N` every N bytes."""
    kind, size = how.split(":")
    if kind == "bytes":
        return [raw[at : at + int(size)] for at in range(0, len(raw), int(size))]
    events = [event + b"\n\n" for event in raw.split(b"\n\n")[:-1]]
    step = int(size)
    return [b"".join(events[at : at + step]) for at in range(0, len(events), step)]


def read(decoder: OpenAIStreamDecoder, pieces: list[bytes], framed: bool) -> list[Any]:
    """What the client gets (each batch as chat sends it), then what the decoder read."""
    chunks = HttpChunkStream(Answer(pieces), decoder)  # type: ignore[arg-type]
    if framed:
        chunks.frame_events()

    async def run() -> list[Any]:
        sent: list[bytes] = []
        try:
            async for batch in chunks:
                assert batch
                assert all(type(each) is sse.Framed for each in batch) == framed
                sent.append(sse.encode_all(batch))
        except UpstreamError as error:
            sent.append(b"error: " + error.message.encode())
        return [b"".join(sent), decoder.produced, decoder.content, decoder.usage, chunks.ended]

    return asyncio.run(run())


CUTS = ["events:1", "events:2", "events:3", "events:100", "bytes:1", "bytes:7", "bytes:64"]


@pytest.mark.parametrize("how", CUTS)
@pytest.mark.parametrize("wants_usage", [False, True], ids=["usage-ours", "usage-asked"])
@pytest.mark.parametrize("keep", [False, True], ids=["counted", "kept"])
@pytest.mark.parametrize("name", list(FRAMED_STREAMS))
def test_framed_events_are_what_parsing_each_chunk_gives(
    name: str, keep: bool, wants_usage: bool, how: str
) -> None:
    stream, extension = FRAMED_STREAMS[name], "x_groq" if name == "x_groq" else None
    pieces = cut(body(stream), how)
    framed = read(OpenAIStreamDecoder(wants_usage, keep, extension), pieces[:], True)
    parsed = read(Parsing(wants_usage, keep, extension), pieces[:], False)
    assert framed == parsed


RAW = {
    "crlf": body(texts("a", "b", "c")).replace(b"\n", b"\r\n"),
    "comments": b": keep-alive\n\n" + body(texts("a", "b")) + b": bye\n\n",
    "comment-mid-run": body(texts("a", "b")).replace(b"data: [DONE]", b": x\n\ndata: [DONE]"),
    "bom": b"\xef\xbb\xbf" + body(texts("a", "b")),
    "named-event": b"event: message\n" + body(texts("a", "b", "c")),
    "multi-line-data": body(texts("a", "b", "c")).replace(b',"logprobs"', b'\ndata: ,"logprobs"'),
    "no-space": body(texts("a", "b", "c")).replace(b"data: ", b"data:"),
    "two-spaces": body(texts("a", "b", "c")).replace(b"data: {", b"data:  {"),
    "blank-lines": body(texts("a", "b")).replace(b"\n\n", b"\n\n\n"),
    "no-done": body(texts("a", "b", "c"))[: -len(b"data: [DONE]\n\n")],
    "after-done": body(texts("a", "b")) + b"data: " + texts("c")[0] + b"\n\n",
    "not-json": body(texts("a", "b")).replace(b"data: [DONE]", b"data: {nope"),
    "empty-data": body(texts("a")).replace(b"data: [DONE]", b"data: \n\ndata: [DONE]"),
}


@pytest.mark.parametrize("how", CUTS)
@pytest.mark.parametrize("name", list(RAW))
def test_framed_events_of_any_sse_form_are_what_the_parser_gives(name: str, how: str) -> None:
    pieces = cut(RAW[name], how) if how.startswith("bytes") else [RAW[name]]
    framed = read(OpenAIStreamDecoder(False), pieces[:], True)
    parsed = read(Parsing(False), pieces[:], False)
    assert framed == parsed


def test_a_stream_of_one_shape_goes_out_as_the_upstream_wrote_it() -> None:
    """Nothing is re-encoded: the client's bytes are the upstream's, but for the usage chunk
    the sidecar asked for and `[DONE]` (the endpoint sends its own at the end)."""
    stream = FRAMED_STREAMS["role-then-run"]
    sent, produced, _content, usage, ended = read(OpenAIStreamDecoder(False), [body(stream)], True)
    assert sent == body(stream[:-1])[: -len(sse.DONE)]
    assert produced == sum(len(f"tok{i} ") for i in range(20))
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, 9)
    assert ended


def test_what_changes_is_cut_out_of_the_upstream_bytes() -> None:
    """`"usage": null` on every chunk (there only because the sidecar asked for usage) is
    taken out of each: none of those chunks goes out as it came."""
    stream = FRAMED_STREAMS["usage-null-every-chunk"]
    sent, *_ = read(OpenAIStreamDecoder(False), [body(stream)], True)
    expected = [stream[0]] + [
        orjson.dumps({k: v for k, v in orjson.loads(data).items() if k != "usage"})
        for data in stream[1:-1]
    ]
    assert sent == body(expected)[: -len(sse.DONE)]
    assert b'"usage"' not in sent


def test_a_large_piece_is_handed_out_in_batches_of_at_most_batch_bytes() -> None:
    """What a write waiting for a slow client holds stays bounded: a piece of many events
    goes out BATCH_BYTES at a time (cut after an event), the bytes the same as parsing."""
    stream = [ROLE, *texts(*(f"token {i} " for i in range(3000))), chunk({}, "stop"), USAGE]
    raw = body(stream)
    assert len(raw) > 4 * BATCH_BYTES
    chunks = HttpChunkStream(Answer([raw]), OpenAIStreamDecoder(False))  # type: ignore[arg-type]
    chunks.frame_events()

    async def batches() -> list[bytes]:
        return [sse.encode_all(batch) async for batch in chunks]

    sent = asyncio.run(batches())
    assert len(sent) >= 4
    assert max(map(len, sent)) <= BATCH_BYTES
    assert b"".join(sent) == read(Parsing(False), [raw], False)[0]
