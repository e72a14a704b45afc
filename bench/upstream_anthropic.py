"""The benchmark's Anthropic upstream: a Messages API server that answers at once.

POST /v1/messages → a fixed `message`, or with "stream": true its SSE events as Anthropic's
API reference shows them (message_start, content_block_start, a ping, 20 content_block_delta,
content_block_stop, message_delta with the output usage, message_stop). The answer is
bench/upstream.py's: the same text and token counts, the stream the same 20 pieces, so the
sidecar's OpenAI path and its Anthropic path are measured on the same content. No checks of
the request (tests/upstreams/anthropic_fake.py does those, with the SDK, far too slowly for a
bench); no sleeps.
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
from aiohttp import web

from bench.upstream import CHUNKS

MESSAGE = orjson.dumps(
    {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "model": "bench-model",
        "content": [{"type": "text", "text": "The quick brown fox jumps."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 24, "output_tokens": 8},
    }
)

EVENTS: list[dict[str, object]] = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_bench",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "bench-model",
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 24, "output_tokens": 1},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    *(
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": f"tok{i} "},
        }
        for i in range(CHUNKS)
    ),
    {"type": "content_block_stop", "index": 0},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 20},
    },
    {"type": "message_stop"},
]
STREAM = b"".join(
    b"event: %s\ndata: %s\n\n" % (str(event["type"]).encode(), orjson.dumps(event))
    for event in EVENTS
)


async def messages(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    if b'"stream":true' not in body.replace(b" ", b""):
        return web.Response(body=MESSAGE, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    try:
        await response.prepare(request)
        await response.write(STREAM)
        await response.write_eof()
    except ConnectionResetError:  # the sidecar's client left mid-stream (wrk at a run's end)
        pass
    return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvloop

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
