"""`passthrough:` (SPEC 2.6): other OpenAI paths forwarded to a provider with its key, after auth
and rate limits, counted in metrics; bodies streamed both ways. Driven with the official SDK
through a real sidecar, against a fake upstream that records what it receives."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from sidecar.api.passthrough import answer_headers, forwarded_headers
from sidecar.settings import ConfigError, load_settings
from tests.conftest import PROVIDER_KEY, openai_config
from tests.procs import SidecarProcess, wait_until
from tests.support import metric, metric_samples, module_sidecar, request
from tests.upstreams.server import ThreadedServer

CLIENT_KEY = "sk-ringside-client-key"
LIMITED_KEY = "sk-ringside-limited-key"
RESTRICTED_KEY = "sk-ringside-restricted-key"
OTHER_PROVIDER_KEY = "sk-the-other-provider"
SPEECH_PIECES = [b"ID3" + bytes([n]) * 4096 for n in range(5)]
TRANSCRIPT_EVENTS = [
    {"type": "transcript.text.delta", "delta": "hello "},
    {"type": "transcript.text.delta", "delta": "world"},
    {"type": "transcript.text.done", "text": "hello world"},
]


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class Received:
    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    body: bytes


class RecordingUpstream:
    """An OpenAI-shaped upstream for the pass-through paths: moderations, files (multipart
    upload, download), speech (a binary answer streamed in pieces, the second one held until the
    test saw the first), and error answers picked by the moderation input."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.first_piece_seen = threading.Event()
        self.server = ThreadedServer(self._app)

    @property
    def url(self) -> str:
        return self.server.url

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(
            Received(
                request.method,
                request.path,
                request.rel_url.raw_query_string,
                CIMultiDict(request.headers),
                body,
            )
        )
        path = request.path.removeprefix("/other")
        if path == "/moderations":
            return self._moderation(orjson.loads(body))
        if path == "/files" and request.method == "POST":
            return self._file(request, body)
        if path.startswith("/files/") and path.endswith("/content"):
            return web.Response(body=b"line one\nline two\n", content_type="application/jsonl")
        if path == "/audio/speech":
            return await self._speech(request)
        if path == "/audio/transcriptions":
            return await self._transcription(request)
        return web.json_response(
            {"error": {"message": "fake: no such path", "type": "invalid_request_error",
                       "param": None, "code": "unknown_url"}},
            status=404,
        )  # fmt: skip

    @staticmethod
    def _moderation(body: dict[str, Any]) -> web.Response:
        given = body.get("input")
        error: dict[str, Any]
        if given == "make a 400":
            error = {"message": "input is not allowed here", "type": "invalid_request_error",
                     "param": "input", "code": "invalid_value"}  # fmt: skip
            return web.json_response({"error": error}, status=400, headers={"X-Upstream": "yes"})
        if given == "reject the key":
            error = {
                "message": f"Incorrect API key provided: {PROVIDER_KEY[:8]}****",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
            return web.json_response({"error": error}, status=401)
        result = {"flagged": False, "categories": {"violence": False},
                  "category_scores": {"violence": 0.001}}  # fmt: skip
        return web.json_response(
            {"id": "modr-1", "model": body.get("model", "omni-moderation-latest"),
             "results": [result]},
            headers={"Set-Cookie": "upstream=1", "openai-organization": "org-secret",
                     "openai-processing-ms": "12", "x-ratelimit-limit-requests": "10000",
                     "x-request-id": "req_upstream"},
        )  # fmt: skip

    @staticmethod
    def _file(request: web.Request, body: bytes) -> web.Response:
        return web.json_response(
            {"id": "file-abc", "object": "file", "bytes": len(body), "created_at": 1,
             "filename": "notes.jsonl", "purpose": "batch", "status": "processed"}
        )  # fmt: skip

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
        await response.prepare(request)
        await response.write(SPEECH_PIECES[0])
        # the rest only once the client has the first piece: it has to be streamed to get it
        await asyncio.get_running_loop().run_in_executor(None, self.first_piece_seen.wait, 10)
        for piece in SPEECH_PIECES[1:]:
            await response.write(piece)
        await response.write_eof()
        return response

    @staticmethod
    async def _transcription(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in TRANSCRIPT_EVENTS:
            await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    def last(self) -> Received:
        return self.received[-1]


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    fake = RecordingUpstream()
    fake.server.start()
    yield fake
    fake.server.stop()


def gateway_config(upstream_url: str) -> dict[str, Any]:
    config = openai_config(
        upstream_url,
        keys=[
            {"id": "app1", "sha256": sha256(CLIENT_KEY), "developer": "alice"},
            {"id": "limited", "sha256": sha256(LIMITED_KEY), "rate_limit": {"rpm": 2}},
            {"id": "narrow", "sha256": sha256(RESTRICTED_KEY), "allowed": ["slot:*"]},
        ],
        passthrough={
            "/v1/moderations": "openai",
            "/v1/files": "openai",
            "/v1/audio": "openai",
            "/v1/audio/translations": "other",  # the longest prefix wins
        },
        limits={"max_body_bytes": 64 * 1024},
    )
    config["providers"]["other"] = {
        "kind": "deepseek",  # a base URL without /v1: /v1/<rest> goes to {base_url}/<rest>
        "base_url": upstream_url + "/other",
        "api_key_env": "OTHER_KEY",
    }
    return config


@pytest.fixture(scope="module")
def gateway(
    upstream: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    workdir = tmp_path_factory.mktemp("passthrough")
    yield from module_sidecar(
        workdir, gateway_config(upstream.url), {"OTHER_KEY": OTHER_PROVIDER_KEY}
    )


@pytest.fixture
def client(gateway: SidecarProcess, upstream: RecordingUpstream) -> openai.OpenAI:
    upstream.received.clear()
    return openai.OpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0, timeout=15)


def test_moderations_reach_the_provider_with_its_key_never_the_clients(
    client: openai.OpenAI, upstream: RecordingUpstream
) -> None:
    result = client.moderations.create(input="a kind sentence", model="omni-moderation-latest")
    assert result.id == "modr-1"
    assert result.results[0].flagged is False
    seen = upstream.last()
    assert (seen.method, seen.path) == ("POST", "/moderations")
    sent = orjson.loads(seen.body)
    assert sent == {"input": "a kind sentence", "model": "omni-moderation-latest"}
    assert seen.headers["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert CLIENT_KEY not in str(dict(seen.headers))
    assert seen.headers["Content-Type"] == "application/json"


def test_the_answer_headers_are_the_upstreams_without_cookies_and_account_details(
    gateway: SidecarProcess, upstream: RecordingUpstream
) -> None:
    answer = request(
        gateway.url,
        "POST",
        "/v1/moderations",
        {"input": "hello"},
        {"Authorization": f"Bearer {CLIENT_KEY}", "X-Request-Id": "pt-headers"},
    )
    assert answer.status == 200
    assert answer.headers["openai-processing-ms"] == "12"
    assert answer.headers["X-Request-Id"] == "pt-headers"
    for dropped in ("Set-Cookie", "openai-organization", "x-ratelimit-limit-requests"):
        assert dropped not in answer.headers, dropped


def test_a_multipart_upload_reaches_the_provider_byte_for_byte(
    client: openai.OpenAI, upstream: RecordingUpstream
) -> None:
    content = b'{"custom_id": "1"}\n' * 1000  # ~19 KB: several pieces on the way
    created = client.files.create(file=("notes.jsonl", content), purpose="batch")
    assert created.id == "file-abc"
    seen = upstream.last()
    assert (seen.method, seen.path) == ("POST", "/files")
    assert seen.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert created.bytes == len(seen.body) == int(seen.headers["Content-Length"])
    assert content in seen.body and b'name="purpose"' in seen.body and b"batch" in seen.body
    assert seen.headers["Authorization"] == f"Bearer {PROVIDER_KEY}"


def test_a_download_comes_back_whole_with_its_length_and_query_string(
    gateway: SidecarProcess, client: openai.OpenAI, upstream: RecordingUpstream
) -> None:
    content = client.files.content("file-abc")
    assert content.read() == b"line one\nline two\n"
    assert upstream.last().path == "/files/file-abc/content"
    answer = request(
        gateway.url,
        "GET",
        "/v1/files/file-abc/content?limit=2&after=x%20y",
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
    )
    assert (answer.status, answer.body) == (200, b"line one\nline two\n")
    assert answer.headers["Content-Length"] == str(len(answer.body))
    assert upstream.last().query == "limit=2&after=x%20y"
    assert upstream.last().method == "GET"


def test_speech_streams_back_as_the_provider_produces_it(
    client: openai.OpenAI, upstream: RecordingUpstream
) -> None:
    upstream.first_piece_seen.clear()
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="alloy", input="hello"
    ) as response:
        assert response.headers["Content-Type"] == "audio/mpeg"
        pieces = response.iter_bytes(1024)
        first = next(pieces)
        assert first == SPEECH_PIECES[0][:1024]  # before the upstream produced the rest
        upstream.first_piece_seen.set()
        rest = b"".join(pieces)
    assert first + rest == b"".join(SPEECH_PIECES)
    assert upstream.last().path == "/audio/speech"


def test_a_streamed_transcription_comes_back_as_server_sent_events(
    client: openai.OpenAI, upstream: RecordingUpstream
) -> None:
    stream = client.audio.transcriptions.create(
        file=("hello.wav", b"RIFF" + b"\0" * 2048), model="gpt-4o-mini-transcribe", stream=True
    )
    events = [event.model_dump(exclude_none=True) for event in stream]
    assert events == TRANSCRIPT_EVENTS
    seen = upstream.last()
    assert seen.path == "/audio/transcriptions"
    assert seen.headers["Content-Type"].startswith("multipart/form-data")
    assert b'name="stream"' in seen.body and b"RIFF" in seen.body


def test_a_client_that_leaves_mid_answer_is_logged_as_499(
    gateway: SidecarProcess, client: openai.OpenAI, upstream: RecordingUpstream
) -> None:
    upstream.first_piece_seen.clear()
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts",
        voice="alloy",
        input="hello",
        extra_headers={"X-Request-Id": "pt-leaves"},
    ) as response:
        next(response.iter_bytes(1024))
    upstream.first_piece_seen.set()  # the rest comes, and finds nobody

    def logged() -> list[dict[str, Any]]:
        return [r for r in gateway.access_log() if r["request_id"] == "pt-leaves"]

    assert wait_until(logged)[0]["status"] == 499


def test_an_upload_the_client_breaks_off_is_logged_as_499(gateway: SidecarProcess) -> None:
    import socket

    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; b=1\r\n"
            + f"Authorization: Bearer {CLIENT_KEY}\r\n".encode()
            + b"X-Request-Id: pt-broken\r\nContent-Length: 10000\r\n\r\n"
            + b"only the start of it"
        )
        time.sleep(0.2)

    def logged() -> list[dict[str, Any]]:
        return [r for r in gateway.access_log() if r["request_id"] == "pt-broken"]

    assert wait_until(logged)[0]["status"] == 499


def test_the_longest_prefix_wins_and_a_base_url_without_v1_takes_the_rest_of_the_path(
    gateway: SidecarProcess, upstream: RecordingUpstream
) -> None:
    upstream.received.clear()
    answer = request(
        gateway.url,
        "POST",
        "/v1/audio/translations",
        {"input": "x"},
        {"Authorization": f"Bearer {CLIENT_KEY}"},
    )
    assert answer.status == 404  # the fake knows no such path: its own 404, passed through
    seen = upstream.last()
    assert seen.path == "/other/audio/translations"
    assert seen.headers["Authorization"] == f"Bearer {OTHER_PROVIDER_KEY}"


def test_without_a_key_it_is_401_and_nothing_reaches_the_provider(
    gateway: SidecarProcess, upstream: RecordingUpstream
) -> None:
    upstream.received.clear()
    answer = request(gateway.url, "POST", "/v1/moderations", {"input": "hello"})
    assert answer.status == 401
    assert answer.error["code"] == "invalid_api_key"
    assert upstream.received == []


def test_a_key_over_its_rate_limit_is_429_like_chat(
    gateway: SidecarProcess, upstream: RecordingUpstream
) -> None:
    limited = openai.OpenAI(base_url=gateway.base_url, api_key=LIMITED_KEY, max_retries=0)
    limited.moderations.create(input="one")
    limited.moderations.create(input="two")
    upstream.received.clear()
    with pytest.raises(openai.RateLimitError) as refused:
        limited.moderations.create(input="three")
    assert refused.value.status_code == 429
    assert refused.value.response.headers["X-Ringside-RateLimit-Scope"] == "token"
    assert refused.value.code == "rate_limited"
    assert upstream.received == []


def test_a_key_limited_to_some_models_may_not_pass_through(
    gateway: SidecarProcess, upstream: RecordingUpstream
) -> None:
    upstream.received.clear()
    narrow = openai.OpenAI(base_url=gateway.base_url, api_key=RESTRICTED_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        narrow.moderations.create(input="hello")
    assert refused.value.code == "passthrough_not_allowed"
    assert upstream.received == []


def test_an_upstream_error_is_passed_through_as_it_is(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as failed:
        client.moderations.create(input="make a 400")
    error = failed.value
    assert error.status_code == 400
    assert error.body == {
        "message": "input is not allowed here",
        "type": "invalid_request_error",
        "param": "input",
        "code": "invalid_value",
    }
    assert error.response.headers["X-Upstream"] == "yes"


def test_the_provider_rejecting_the_gateways_key_is_a_503_that_quotes_nothing_of_it(
    client: openai.OpenAI,
) -> None:
    with pytest.raises(openai.InternalServerError) as failed:
        client.moderations.create(input="reject the key")
    assert failed.value.status_code == 503
    assert failed.value.code == "upstream_unavailable"
    assert PROVIDER_KEY[:8] not in failed.value.message


def test_an_unreachable_provider_is_503_upstream_unavailable(
    tmp_path: Path, sidecar_factory: Any
) -> None:
    proc = sidecar_factory(
        openai_config("http://127.0.0.1:9/v1", passthrough={"/v1/moderations": "openai"})
    )
    answer = request(proc.url, "POST", "/v1/moderations", {"input": "x"})
    assert answer.status == 503
    assert answer.error["code"] == "upstream_unavailable"


def test_an_unconfigured_path_is_the_404_naming_what_is_served(gateway: SidecarProcess) -> None:
    answer = request(
        gateway.url, "POST", "/v1/batches", {}, {"Authorization": f"Bearer {CLIENT_KEY}"}
    )
    assert answer.status == 404
    message = answer.error["message"]
    assert "POST /v1/batches" in message and "POST /v1/chat/completions" in message
    assert "passed through to providers: /v1/audio, /v1/audio/translations, /v1/files, " in message
    assert "/v1/moderations)" in message
    # a prefix matches whole segments only
    answer = request(gateway.url, "GET", "/v1/filesystem", headers={})
    assert answer.status == 404


@pytest.mark.parametrize(
    "path",
    [
        "/v1/files/../chat/completions",
        "/v1/files/%2e%2e/x",
        "/v1/files/a%2Fb",
        "/v1/files//x",
        "/v1/files/./x",
        "/v1/files/..",
        "/v1/files/a%5cb",
    ],
)
def test_a_path_that_could_leave_its_prefix_upstream_is_refused(
    gateway: SidecarProcess, upstream: RecordingUpstream, path: str
) -> None:
    upstream.received.clear()
    answer = request(gateway.url, "GET", path, headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert (answer.status, answer.error["code"]) == (400, "invalid_request"), answer.body
    assert "cannot be forwarded" in answer.error["message"]
    assert upstream.received == []


def test_a_body_over_max_body_bytes_is_413_before_anything_is_sent(
    gateway: SidecarProcess, upstream: RecordingUpstream
) -> None:
    upstream.received.clear()
    answer = request(
        gateway.url,
        "POST",
        "/v1/files",
        b"x" * (64 * 1024 + 1),
        {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "multipart/form-data; b=1"},
    )
    assert answer.status == 413
    assert answer.error["code"] == "request_too_large"
    assert upstream.received == []


def test_metrics_and_the_access_log_show_the_calls(
    gateway: SidecarProcess, client: openai.OpenAI
) -> None:
    before = metric_samples(gateway)
    client.moderations.create(input="counted", extra_headers={"X-Request-Id": "pt-counted"})
    after = metric_samples(gateway)
    upstream_calls = "ringside_upstream_requests_total"
    labels = {"provider": "openai", "model": "/v1/moderations", "outcome": "success"}
    assert metric(after, upstream_calls, **labels) == metric(before, upstream_calls, **labels) + 1
    requests = "ringside_requests_total"
    assert metric(after, requests, code="200") == metric(before, requests, code="200") + 1

    def logged() -> list[dict[str, Any]]:
        return [r for r in gateway.access_log() if r["request_id"] == "pt-counted"]

    line = wait_until(logged)[0]
    assert (line["path"], line["status"], line["key_id"]) == ("/v1/moderations", 200, "app1")


def test_the_request_headers_sent_up_are_the_safe_ones_and_the_providers() -> None:
    client = CIMultiDict(
        {
            "Authorization": "Bearer sk-client",
            "Cookie": "a=b",
            "FC-Customer": "c1",
            "Connection": "keep-alive",
            "Transfer-Encoding": "chunked",
            "Idempotency-Key": "k",
            "Content-Type": "application/json",
            "OpenAI-Beta": "assistants=v2",
            "Accept": "*/*",
        }
    )
    sent = forwarded_headers(client, {"Authorization": "Bearer sk-provider"})
    assert sent == {
        "Content-Type": "application/json",
        "OpenAI-Beta": "assistants=v2",
        "Accept": "*/*",
        "Authorization": "Bearer sk-provider",
    }


def test_the_answer_headers_drop_hop_by_hop_ones_and_those_connection_names() -> None:
    upstream = CIMultiDict(
        [
            ("Content-Type", "audio/mpeg"),
            ("Connection", "keep-alive, X-Private"),
            ("X-Private", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("Set-Cookie", "a=b"),
            ("openai-processing-ms", "3"),
        ]
    )
    assert dict(answer_headers(upstream)) == {
        "Content-Type": "audio/mpeg",
        "openai-processing-ms": "3",
    }


BASE = """\
storage: {backend: memory}
providers:
  openai: {kind: openai, base_url: "http://127.0.0.1:9/v1"}
  claude: {kind: anthropic}
  demo: {kind: mock}
"""


@pytest.mark.parametrize(
    ("passthrough", "words"),
    [
        ('{"/v1/chat": openai}', "overlaps /v1/chat/completions"),
        ('{"/v1/models/x": openai}', "overlaps /v1/models"),
        ('{"/v1/": openai}', "overlaps /v1/chat/completions"),
        ('{"/v1/embeddings": openai}', "overlaps /v1/embeddings"),
        ('{"/v1/files": nobody}', "provider 'nobody' is not in providers"),
        ('{"/v1/files": claude}', "kind anthropic, whose API is not OpenAI's"),
        ('{"/v1/files": demo}', "kind mock"),
        ('{"/v1/files": openai, "/v1/files/": openai}', "is /v1/files again"),
        ('{"/v1/a/../files": openai}', "no empty, . or .. segment"),
        ('{"/files": openai}', "does not match"),
    ],
)
def test_a_passthrough_config_that_cannot_work_is_refused_at_load(
    tmp_path: Path, passthrough: str, words: str
) -> None:
    path = tmp_path / "ringside.yaml"
    path.write_text(BASE + f"passthrough: {passthrough}\n")
    with pytest.raises(ConfigError) as refused:
        load_settings(str(path))
    assert words in str(refused.value), str(refused.value)
    assert f"{path}:" in str(refused.value)


def test_nested_prefixes_load_longest_first(tmp_path: Path) -> None:
    path = tmp_path / "ringside.yaml"
    path.write_text(BASE + 'passthrough: {"/v1/audio": openai, "/v1/audio/speech/": openai}\n')
    settings = load_settings(str(path))
    assert list(settings.passthrough) == ["/v1/audio/speech", "/v1/audio"]


def test_a_chunked_upload_is_read_up_to_the_limit_then_forwarded(
    gateway: SidecarProcess, upstream: RecordingUpstream
) -> None:
    import http.client

    upstream.received.clear()
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=15)
    pieces = [b'{"input": ', b'"chunked"}']
    conn.request(
        "POST",
        "/v1/moderations",
        body=iter(pieces),
        headers={"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"},
        encode_chunked=True,
    )
    answer = conn.getresponse()
    assert answer.status == 200, answer.read()
    conn.close()
    seen = upstream.last()
    assert seen.body == b"".join(pieces)
    assert seen.headers["Content-Length"] == str(len(seen.body))


async def test_an_upload_waits_for_the_upstream_to_take_it() -> None:
    """Flow control: while the upstream reads nothing, the upload stops taking pieces from the
    client (what the sidecar holds is the socket buffers, not the body)."""
    from sidecar.http1 import Http1Client, Upload

    total = 64 * 1024 * 1024
    piece = b"x" * (256 * 1024)
    produced = 0
    reading = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await reading.wait()
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.json_response({"size": size})

    app = web.Application(client_max_size=total + 1)
    app.router.add_post("/upload", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def pieces() -> Any:
        nonlocal produced
        while produced < total:
            await asyncio.sleep(0)  # as a client's body arrives: a piece at a time
            produced += len(piece)
            yield piece

    client = Http1Client({})
    try:
        target = client.target(f"http://127.0.0.1:{port}/upload")
        sending = asyncio.ensure_future(client.forward(target, {}, Upload(pieces(), total), 2, 10))
        await asyncio.sleep(0.5)
        assert produced < total // 2, produced  # held back: the upstream has read nothing
        reading.set()
        answer = await sending
        body = await answer.body.read()
        answer.close()
        assert orjson.loads(body) == {"size": total}
    finally:
        reading.set()
        client.close()
        await runner.cleanup()
