"""The benchmark's upstream: an OpenAI-shaped server that answers at once.

POST /v1/chat/completions → a fixed chat.completion, or with "stream": true a 20-chunk SSE stream
(with usage when asked). No sleeps: whatever latency is measured belongs to the path under test.
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
from aiohttp import web

CHUNKS = 20
COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The quick brown fox jumps."},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 24, "completion_tokens": 8, "total_tokens": 32},
    }
)


def _chunk(delta: dict[str, object], finish: str | None) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "bench-model",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
    )


STREAM = b"".join(
    [b"data: " + _chunk({"role": "assistant", "content": ""}, None) + b"\n\n"]
    + [b"data: " + _chunk({"content": f"tok{i} "}, None) + b"\n\n" for i in range(CHUNKS)]
    + [b"data: " + _chunk({}, "stop") + b"\n\n"]
)
USAGE = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"bench-model","choices":[],"usage":{"prompt_tokens":24,"completion_tokens":20,'
    b'"total_tokens":44}}\n\n'
)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    if b'"stream":true' not in body.replace(b" ", b""):
        return web.Response(body=COMPLETION, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(
        STREAM + (USAGE if b"include_usage" in body else b"") + b"data: [DONE]\n\n"
    )
    await response.write_eof()
    return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvloop

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
