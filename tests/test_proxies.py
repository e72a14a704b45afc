"""Egress proxies (SPEC 5): HTTPS_PROXY / HTTP_PROXY / NO_PROXY read as curl does, and a
provider's own `proxy:`, through a real CONNECT proxy run by the test in front of fake
upstreams (plain http, and TLS with a trustme certificate trusted through the provider's
`tls.ca_file`); a sidecar process each, as a user runs it."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trustme
from aiohttp import web

from sidecar.http1.pool import Origin
from sidecar.http1.proxy import ProxyEnv
from tests.conftest import openai_config
from tests.procs import SidecarProcess
from tests.support import HELLO, post_chat
from tests.test_upstream_wire import BODY, MINI, serve


class ConnectProxy:
    """A forward proxy on loopback: tunnels CONNECT, relays absolute-form requests, and
    records each request line and Proxy-Authorization; or answers every request with
    `refusal`."""

    def __init__(self, refusal: bytes | None = None) -> None:
        self.refusal = refusal
        self.lines: list[str] = []
        self.authorizations: list[str | None] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.port = 0

    def start(self) -> ConnectProxy:
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)
        return self

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials}127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        self.lines.append(lines[0])
        auth = [line.split(":", 1)[1].strip() for line in lines[1:]
                if line.lower().startswith("proxy-authorization:")]  # fmt: skip
        self.authorizations.append(auth[0] if auth else None)
        if self.refusal is not None:
            writer.write(self.refusal)
            await writer.drain()
            writer.close()
            return
        method, target, version = lines[0].split(" ")
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:  # absolute form: to the origin in origin form
            url = urlsplit(target)
            up_reader, up_writer = await asyncio.open_connection(url.hostname, url.port or 80)
            rest = [line for line in lines[1:] if not line.lower().startswith("proxy-")]
            path = url.path + (f"?{url.query}" if url.query else "")
            up_writer.write("\r\n".join([f"{method} {path} {version}", *rest]).encode("latin-1"))
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
def proxy() -> Iterator[ConnectProxy]:
    server = ConnectProxy().start()
    yield server
    server.stop()


@pytest.fixture
def refusing_proxy() -> Iterator[ConnectProxy]:
    server = ConnectProxy(
        b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


async def answer(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


@pytest.fixture
def http_upstream() -> Iterator[str]:
    yield from serve(answer)


@pytest.fixture
def https_upstream(ca: tuple[trustme.CA, Path]) -> Iterator[str]:
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca[0].issue_cert("127.0.0.1").configure_cert(context)
    yield from serve(answer, context)


def config(base_url: str, ca_file: Path | None = None, **provider: Any) -> dict[str, Any]:
    data = openai_config(base_url)
    if ca_file is not None:
        provider["tls"] = {"ca_file": str(ca_file)}
    data["providers"]["openai"].update(provider)
    return data


def ask(proc: SidecarProcess) -> Any:
    return post_chat(proc, {"model": MINI, "messages": HELLO})


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def test_an_https_upstream_is_reached_through_connect_from_https_proxy(
    proxy: ConnectProxy,
    https_upstream: str,
    ca: tuple[trustme.CA, Path],
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    proc = sidecar_factory(
        config(https_upstream, ca[1]), {"HTTPS_PROXY": proxy.url("egress:s%40cret@")}
    )
    answer = ask(proc)
    assert answer.status == 200, answer.body
    assert answer.json()["choices"][0]["message"]["content"] == "over the wire"
    assert proxy.lines == [f"CONNECT 127.0.0.1:{port_of(https_upstream)} HTTP/1.1"]
    assert proxy.authorizations == ["Basic " + base64.b64encode(b"egress:s@cret").decode()]


def test_an_http_upstream_goes_through_http_proxy_in_absolute_form(
    proxy: ConnectProxy, http_upstream: str, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(config(http_upstream), {"http_proxy": proxy.url()})
    assert ask(proc).status == 200
    assert ask(proc).status == 200  # the second on the same proxied connection
    port = port_of(http_upstream)
    assert proxy.lines == [f"POST http://127.0.0.1:{port}/v1/chat/completions HTTP/1.1"]


def test_a_provider_proxy_is_used_without_any_variable(
    proxy: ConnectProxy,
    https_upstream: str,
    ca: tuple[trustme.CA, Path],
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    proc = sidecar_factory(config(https_upstream, ca[1], proxy=proxy.url()))
    assert ask(proc).status == 200
    assert proxy.lines == [f"CONNECT 127.0.0.1:{port_of(https_upstream)} HTTP/1.1"]


def test_a_provider_proxy_none_goes_direct_whatever_the_environment(
    proxy: ConnectProxy,
    https_upstream: str,
    ca: tuple[trustme.CA, Path],
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    proc = sidecar_factory(
        config(https_upstream, ca[1], proxy="none"), {"HTTPS_PROXY": proxy.url()}
    )
    assert ask(proc).status == 200
    assert proxy.lines == []


def test_no_proxy_sends_a_listed_address_direct(
    proxy: ConnectProxy,
    https_upstream: str,
    ca: tuple[trustme.CA, Path],
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    env = {"HTTPS_PROXY": proxy.url(), "NO_PROXY": ".example.com, 127.0.0.0/8"}
    proc = sidecar_factory(config(https_upstream, ca[1]), env)
    assert ask(proc).status == 200
    assert proxy.lines == []


def test_a_proxy_refusing_connect_is_an_upstream_outage_logged_without_credentials(
    refusing_proxy: ConnectProxy,
    https_upstream: str,
    ca: tuple[trustme.CA, Path],
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    proc = sidecar_factory(
        config(https_upstream, ca[1]), {"HTTPS_PROXY": refusing_proxy.url("egress:hunter2@")}
    )
    answer = ask(proc)
    assert answer.status == 503
    assert answer.error["code"] == "upstream_unavailable"
    proc.stop()
    log = proc.stderr_path.read_text() + proc.stdout_path.read_text()
    assert "refused CONNECT" in log and "407" in log
    assert "hunter2" not in log


def test_a_proxy_refusing_a_plain_request_with_407_is_an_upstream_outage(
    refusing_proxy: ConnectProxy,
    http_upstream: str,
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    proc = sidecar_factory(config(http_upstream, proxy=refusing_proxy.url()))
    answer = ask(proc)
    assert answer.status == 503
    assert answer.error["code"] == "upstream_unavailable"


# -- the environment as curl reads it, in-process


def origin(scheme: str, host: str) -> Origin:
    return Origin(scheme, host, 443 if scheme == "https" else 80)


def test_no_proxy_matches_names_and_subdomains_with_or_without_a_dot() -> None:
    env = ProxyEnv.read({"HTTPS_PROXY": "proxy:3128", "NO_PROXY": "example.com,.internal"})
    assert env.for_origin(origin("https", "example.com")) is None
    assert env.for_origin(origin("https", "api.example.com")) is None
    assert env.for_origin(origin("https", "svc.internal")) is None
    found = env.for_origin(origin("https", "notexample.com"))
    assert found is not None and (found.host, found.port) == ("proxy", 3128)


def test_no_proxy_matches_addresses_and_ranges_and_star() -> None:
    env = ProxyEnv.read({"https_proxy": "http://p:1", "no_proxy": "10.0.0.0/8, ::1"})
    assert env.for_origin(origin("https", "10.1.2.3")) is None
    assert env.for_origin(origin("https", "::1")) is None
    assert env.for_origin(origin("https", "127.0.0.1")) is not None  # loopback: not exempt
    assert ProxyEnv.read({"HTTPS_PROXY": "p:1", "NO_PROXY": "*"}).bypass_all


def test_lowercase_variables_win_and_all_proxy_is_the_fallback() -> None:
    env = ProxyEnv.read({"https_proxy": "http://low:1", "HTTPS_PROXY": "http://up:2",
                         "ALL_PROXY": "http://every:3"})  # fmt: skip
    assert env.https is not None and env.https.host == "low"
    assert env.http is not None and env.http.host == "every"
    assert env.http.port == 3 and env.https.shown == "http://low:1"


def test_an_unusable_proxy_variable_fails_closed(
    https_upstream: str,
    ca: tuple[trustme.CA, Path],
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    proc = sidecar_factory(
        config(https_upstream, ca[1]), {"HTTPS_PROXY": "socks5://egress:hunter2@p:1080"}
    )
    answer = ask(proc)  # not sent direct, around the proxy the operator set
    assert answer.status == 503
    assert answer.error["code"] == "upstream_unavailable"
    proc.stop()
    log = proc.stderr_path.read_text() + proc.stdout_path.read_text()
    assert "HTTPS_PROXY is unusable: unsupported proxy scheme 'socks5'" in log
    assert "hunter2" not in log
