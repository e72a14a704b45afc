"""The non-streamed upstream call on the wire (sidecar/http1/): body framings, encodings,
keep-alive and TLS, against small real servers."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import openai_config
from tests.procs import SidecarProcess
from tests.support import CHAT, HELLO, post_chat, sse_events
from tests.upstreams.server import ThreadedServer

MINI = "fc:openai/gpt-4o-mini"
COMPLETION = {
    "id": "chatcmpl-wire",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "over the wire"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
}
BODY = json.dumps(COMPLETION).encode()


def serve(
    handler: Callable[[web.Request], Any], tls: ssl.SSLContext | None = None
) -> Iterator[str]:
    def make_app() -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        return app

    server = ThreadedServer(make_app, tls).start()
    yield server.url + "/v1"
    server.stop()


def ask(sidecar_factory: Callable[..., SidecarProcess], base_url: str, **env: str) -> Any:
    proc = sidecar_factory(openai_config(base_url), env)
    return proc, post_chat(proc, {"model": MINI, "messages": HELLO})


@pytest.fixture
def chunked_upstream() -> Iterator[str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for at in range(0, len(BODY), 40):
            await response.write(BODY[at : at + 40])
        await response.write_eof()
        return response

    yield from serve(handler)


def test_a_chunked_body_is_read_whole(
    chunked_upstream: str, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    _, answer = ask(sidecar_factory, chunked_upstream)
    assert answer.status == 200
    assert answer.json()["choices"][0]["message"]["content"] == "over the wire"
    assert answer.json()["usage"]["total_tokens"] == 8


@pytest.fixture
def gzip_upstream() -> Iterator[str]:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Accept-Encoding", ""))
        await request.read()
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        return web.Response(body=gzip.compress(BODY), headers=headers)  # sent regardless

    yield from serve(handler)


def test_a_gzip_body_sent_anyway_is_decoded(
    gzip_upstream: str, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    _, answer = ask(sidecar_factory, gzip_upstream)
    assert answer.status == 200
    assert answer.json()["choices"][0]["message"]["content"] == "over the wire"


@pytest.fixture
def counting_upstream() -> Iterator[tuple[str, set[int]]]:
    connections: set[int] = set()

    async def handler(request: web.Request) -> web.Response:
        connections.add(id(request.transport))
        await request.read()
        return web.Response(body=BODY, content_type="application/json")

    for url in serve(handler):
        yield url, connections


def test_sequential_calls_reuse_one_connection(
    counting_upstream: tuple[str, set[int]], sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    url, connections = counting_upstream
    proc = sidecar_factory(openai_config(url))
    for _ in range(5):
        assert post_chat(proc, {"model": MINI, "messages": HELLO}).status == 200
    assert len(connections) == 1


def raw_upstream(reply: bytes) -> Iterator[str]:
    """A server that reads one request and answers with exactly `reply`, then closes."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(
            line.split(b":")[1] for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        ))  # fmt: skip
        await reader.readexactly(length)
        writer.write(reply)
        await writer.drain()
        writer.close()

    async def start() -> None:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port.append(server.sockets[0].getsockname()[1])
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop)
    ready.wait(5)
    yield f"http://127.0.0.1:{port[0]}/v1"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.fixture
def close_delimited_upstream() -> Iterator[str]:
    """HTTP/1.0-style: no Content-Length, no chunking, the body ends with the connection."""
    yield from raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + BODY)


@pytest.fixture
def early_hints_upstream() -> Iterator[str]:
    """A 103 Early Hints before the answer: an interim response, not the answer."""
    yield from raw_upstream(
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(BODY)).encode()
        + b"\r\n\r\n"
        + BODY
    )


def test_an_interim_response_is_skipped(
    early_hints_upstream: str, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    _, answer = ask(sidecar_factory, early_hints_upstream)
    assert answer.status == 200
    assert answer.json()["choices"][0]["message"]["content"] == "over the wire"


def test_a_body_ended_by_the_close_is_read_whole(
    close_delimited_upstream: str, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    _, answer = ask(sidecar_factory, close_delimited_upstream)
    assert answer.status == 200
    assert answer.json()["choices"][0]["message"]["content"] == "over the wire"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_upstream(certificate: tuple[Path, Path]) -> Iterator[str]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*map(str, certificate))

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=BODY, content_type="application/json")

    yield from serve(handler, context)


def test_https_upstream_with_a_trusted_certificate(
    tls_upstream: str,
    certificate: tuple[Path, Path],
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    _, answer = ask(sidecar_factory, tls_upstream, SSL_CERT_FILE=str(certificate[0]))
    assert answer.status == 200
    assert answer.json()["choices"][0]["message"]["content"] == "over the wire"


def test_https_upstream_with_an_untrusted_certificate_is_refused(
    tls_upstream: str, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    _, answer = ask(sidecar_factory, tls_upstream)  # the self-signed CA is not trusted
    assert answer.status == 503
    assert answer.error["code"] == "upstream_unavailable"


# -- streamed answers: the same client, the body handed over as it arrives


def sse_body(pieces: list[str]) -> bytes:
    """An OpenAI stream of `pieces` of content, then usage and [DONE]."""
    base = {"id": "chatcmpl-wire", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "gpt-4o-mini"}  # fmt: skip
    events = [
        {**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
        for piece in pieces
    ]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({**base, "choices": [], "usage": COMPLETION["usage"]})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n"
    )


STREAM_PIECES = [f"w{i} " for i in range(30)]
SSE = sse_body(STREAM_PIECES)


def stream_handler(
    body: bytes,
    piece_bytes: int,
    pause: float = 0.0,
    gzipped: bool = False,
    pause_before_end: float = 0.0,
) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        headers = {"Content-Type": "text/event-stream"}
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for at in range(0, len(body), piece_bytes):
            await response.write(body[at : at + piece_bytes])
            if pause:
                await asyncio.sleep(pause)
        await asyncio.sleep(pause_before_end)
        await response.write_eof()
        return response

    return handler


def streamed_content(answer: Any) -> str:
    assert answer.status == 200, answer.body
    events = sse_events(answer.body)
    assert events[-1] == "[DONE]", events[-3:]
    return "".join(
        choice["delta"].get("content") or ""
        for event in events[:-1]
        for choice in json.loads(event)["choices"]
    )


def stream_request() -> dict[str, Any]:
    return {"model": MINI, "messages": HELLO, "stream": True}


@pytest.mark.parametrize("piece_bytes", [7, 4096])
def test_a_stream_cut_anywhere_arrives_whole(
    piece_bytes: int, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    """Pieces of 7 bytes split lines, events and UTF-8 nowhere near their ends."""
    for url in serve(stream_handler(SSE, piece_bytes, pause=0.001 if piece_bytes == 7 else 0)):
        proc = sidecar_factory(openai_config(url))
        assert streamed_content(post_chat(proc, stream_request())) == "".join(STREAM_PIECES)


def reshaped(body: bytes, shape: str) -> bytes:
    """The same events in other shapes the SSE format allows."""
    events = [e for e in body.split(b"\n\n") if e]
    if shape == "crlf":
        return b"".join(e + b"\r\n\r\n" for e in events)
    if shape == "comments":
        return b": keep-alive\n\nretry: 1000\n" + b"".join(
            b"id: " + str(i).encode() + b"\n" + e + b"\n\n" for i, e in enumerate(events)
        )
    if shape == "split-data":  # the JSON over two data lines (cut after a comma), joined by "\n"
        return b"".join(
            e[: e.index(b", ") + 1] + b"\ndata:" + e[e.index(b", ") + 1 :] + b"\n\n"
            if e != b"data: [DONE]" else e + b"\n\n"
            for e in events
        )  # fmt: skip
    if shape == "no-final-blank-line":
        return body.removesuffix(b"\n\n")
    raise ValueError(shape)


@pytest.mark.parametrize("shape", ["crlf", "comments", "split-data", "no-final-blank-line"])
@pytest.mark.parametrize("piece_bytes", [7, 4096])
def test_every_sse_shape_arrives_whole(
    shape: str, piece_bytes: int, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    for url in serve(stream_handler(reshaped(SSE, shape), piece_bytes)):
        proc = sidecar_factory(openai_config(url))
        assert streamed_content(post_chat(proc, stream_request())) == "".join(STREAM_PIECES)


def test_a_gzip_stream_sent_anyway_is_decoded(
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    packed = gzip.compress(SSE)
    for url in serve(stream_handler(packed, 50, gzipped=True)):
        proc = sidecar_factory(openai_config(url))
        assert streamed_content(post_chat(proc, stream_request())) == "".join(STREAM_PIECES)


def test_sequential_streams_reuse_one_connection(
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    """Also when the body's end (the chunked terminator) comes a moment after [DONE]."""
    connections: set[int] = set()
    send = stream_handler(SSE, 4096, pause_before_end=0.05)

    async def handler(request: web.Request) -> web.StreamResponse:
        connections.add(id(request.transport))
        if not (await request.json()).get("stream"):
            return web.Response(body=BODY, content_type="application/json")
        return await send(request)  # type: ignore[no-any-return]

    for url in serve(handler):
        proc = sidecar_factory(openai_config(url))
        for _ in range(4):
            assert streamed_content(post_chat(proc, stream_request())) == "".join(STREAM_PIECES)
            time.sleep(0.2)  # the client has [DONE] before the upstream's terminator arrives
        assert post_chat(proc, {"model": MINI, "messages": HELLO}).status == 200
    assert len(connections) == 1


def timed_out_stream(sidecar_factory: Callable[..., SidecarProcess], timeout: dict[str, float],
                     handler: Callable[[web.Request], Any]) -> tuple[list[str], float]:  # fmt: skip
    for url in serve(handler):
        config = openai_config(url)
        config["providers"]["openai"]["timeout"] = timeout
        proc = sidecar_factory(config)
        started = time.monotonic()
        answer = post_chat(proc, stream_request())
        took = time.monotonic() - started
    assert answer.status == 200
    return sse_events(answer.body), took


def test_a_stream_that_stalls_past_the_read_timeout_ends_with_an_error_event(
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    half = SSE.index(b"\n\n", len(SSE) // 2) + 2

    async def stalls(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(SSE[:half])
        await asyncio.sleep(3)
        return response

    events, took = timed_out_stream(sidecar_factory, {"connect": 1, "read": 0.4}, stalls)
    error = json.loads(events[-1])["error"]
    assert error["code"] == "upstream_unavailable"
    assert "timed out" in error["message"]
    assert "[DONE]" not in events
    assert took < 2.5


def test_a_stream_past_its_total_timeout_ends_with_an_error_event(
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    """Each piece comes well within `read`; `total` still bounds the whole stream."""
    handler = stream_handler(SSE, len(SSE) // 30, pause=0.1)  # ~3 s in all
    events, took = timed_out_stream(sidecar_factory, {"connect": 1, "read": 1, "total": 0.8},
                                    handler)  # fmt: skip
    assert json.loads(events[-1])["error"]["code"] == "upstream_unavailable"
    assert any('"content"' in event for event in events[:-1])  # it was cut mid-way
    assert took < 2.0


def test_a_slow_reader_gets_every_byte_of_a_large_fast_stream(
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    """The upstream writes ~3 MB at once; the client reads slowly, so the sidecar's reader
    falls behind and pauses the upstream socket, then resumes it: nothing is lost, and the
    next request is served (on a new connection: one paused is not pooled again)."""
    pieces = [f"{i:05d}" + "x" * 2000 for i in range(1500)]
    body = sse_body(pieces)
    for url in serve(stream_handler(body, 64 * 1024)):
        proc = sidecar_factory(openai_config(url))
        conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=30)
        conn.request("POST", CHAT, body=json.dumps(stream_request()),
                     headers={"Content-Type": "application/json"})  # fmt: skip
        response = conn.getresponse()
        received = bytearray()
        while chunk := response.read(32 * 1024):
            received += chunk
            time.sleep(0.002)
        conn.close()
        answer = SimpleNamespace(status=response.status, body=bytes(received))
        assert streamed_content(answer) == "".join(pieces)
        time.sleep(0.2)
        assert streamed_content(post_chat(proc, stream_request())) == "".join(pieces)
