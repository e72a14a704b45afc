"""Server-sent events: decoding an upstream stream and encoding ours."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

DONE = b"data: [DONE]\n\n"


def encode(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


async def decode(lines: AsyncIterable[bytes]) -> AsyncIterator[tuple[str | None, bytes]]:
    """Yield `(event, data)` per event; comments and ids are dropped, multi-line data joined."""
    event: str | None = None
    data: list[bytes] = []
    async for raw in lines:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data:
                yield event, b"\n".join(data)
            event, data = None, []
            continue
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            event = line[6:].strip().decode("utf-8", "replace")
        # ":" comments, id:, retry: carry nothing we forward
    if data:
        yield event, b"\n".join(data)
