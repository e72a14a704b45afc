"""The non-streamed upstream call on the wire (sidecar/http1.py): body framings, encodings,
keep-alive and TLS, against small real servers."""

from __future__ import annotations

import asyncio
import gzip
import json
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import openai_config
from tests.procs import SidecarProcess
from tests.support import HELLO, post_chat
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
