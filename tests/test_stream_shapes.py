"""OpenAIStreamDecoder reads a chunk shaped like the last one it parsed (the same bytes
around a plain content string) without parsing it: whatever the chunks, what it gives the
client and what it reads (content, its length, usage, errors) are what parsing each gives."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sidecar.errors import UpstreamError
from sidecar.providers import openai_compat
from sidecar.providers.openai_compat import OpenAIStreamDecoder

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
    """The reference: every chunk parsed."""

    __slots__ = ()

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
