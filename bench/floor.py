"""The floor: the least an aiohttp + uvloop proxy can do — copy bytes to the upstream and back.

No parsing, no auth, no metrics. The sidecar's CPU per request is compared to this one's.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[SESSION]
    async with session.post(
        request.app[UPSTREAM], data=body, headers={"Content-Type": "application/json"}
    ) as upstream:
        if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            try:
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionResetError:  # the client left mid-stream (wrk at the end of a run)
                pass
            return response
        return web.Response(
            body=await upstream.read(), status=upstream.status, content_type="application/json"
        )


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app[SESSION].close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="full URL of /v1/chat/completions")
    args = parser.parse_args()
    import uvloop

    uvloop.install()
    app = web.Application()
    app[UPSTREAM] = args.upstream
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", forward)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
