"""A provider's own `tls:` (a CA bundle, a client certificate) against an upstream that
requires a client certificate signed by a trustme CA; through a sidecar process."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from tests.procs import SidecarProcess
from tests.test_proxies import answer, ask, ca, config  # noqa: F401  (ca: a fixture)
from tests.test_upstream_wire import serve


@pytest.fixture
def mutual_tls_upstream(ca: tuple[trustme.CA, Path]) -> Iterator[str]:  # noqa: F811
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca[0].issue_cert("127.0.0.1").configure_cert(context)
    ca[0].configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED
    yield from serve(answer, context)


@pytest.fixture
def client_certificate(ca: tuple[trustme.CA, Path], tmp_path: Path) -> dict[str, str]:  # noqa: F811
    issued = ca[0].issue_cert("ringside-client")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return {"ca_file": str(ca[1]), "cert_file": str(cert), "key_file": str(key)}


def test_a_client_certificate_from_tls_is_presented(
    mutual_tls_upstream: str,
    client_certificate: dict[str, str],
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    proc = sidecar_factory(config(mutual_tls_upstream, tls=client_certificate))
    assert ask(proc).status == 200


def test_without_the_client_certificate_the_upstream_is_unavailable(
    mutual_tls_upstream: str,
    ca: tuple[trustme.CA, Path],  # noqa: F811
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    proc = sidecar_factory(config(mutual_tls_upstream, ca[1]))
    answer = ask(proc)
    assert answer.status == 503
    assert answer.error["code"] == "upstream_unavailable"
