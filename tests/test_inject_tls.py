"""The injector's serving certificate follows its files while the process runs (cert-manager
rotation), checked by the certificate a new TLS connection is shown."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.injector import INJECT, InjectorProcess, admission_review, app_pod, leaf_der, write_leaf
from tests.procs import wait_until


def kubelet_secret_dir(root: Path, ca: trustme.CA, generation: int) -> trustme.LeafCert:
    """Write a certificate the way the kubelet updates a mounted Secret: the files go into a
    fresh timestamped directory and the `..data` symlink is swapped to it by a rename;
    `tls.crt` and `tls.key` are symlinks through `..data`."""
    version = root / f"..2026_01_01_00_00_0{generation}.000000001"
    leaf = write_leaf(ca, version)
    swap = root / "..data_tmp"
    swap.symlink_to(version.name)
    swap.rename(root / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")
    return leaf


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def started() -> Iterator[list[InjectorProcess]]:
    procs: list[InjectorProcess] = []
    yield procs
    for proc in procs:
        proc.stop()
        assert "Traceback" not in proc.stderr(), proc.stderr()


def test_a_secret_update_by_symlink_swap_is_served_to_new_connections(
    tmp_path: Path, ca: trustme.CA, started: list[InjectorProcess]
) -> None:
    first = kubelet_secret_dir(tmp_path, ca, 1)
    proc = InjectorProcess(ca, tmp_path / "tls.crt", tmp_path / "tls.key").start()
    started.append(proc)
    assert proc.served_certificate() == leaf_der(first)
    kept = proc.connection()
    kept.request("GET", "/healthz")
    assert kept.getresponse().read()

    second = kubelet_secret_dir(tmp_path, ca, 2)
    assert leaf_der(second) != leaf_der(first)
    assert proc.served_certificate() == leaf_der(second)  # the very next handshake
    assert "patch" in proc.review(admission_review(app_pod(INJECT)))
    kept.request("GET", "/healthz")  # a connection made before keeps working
    assert kept.getresponse().status == 200
    kept.close()
    assert "TLS certificate reloaded" in proc.stderr()


def test_a_certificate_without_its_new_key_keeps_the_old_pair_in_service(
    tmp_path: Path, ca: trustme.CA, started: list[InjectorProcess]
) -> None:
    first = write_leaf(ca, tmp_path)
    proc = InjectorProcess(ca, tmp_path / "tls.crt", tmp_path / "tls.key").start()
    started.append(proc)
    second = write_leaf(ca, tmp_path / "next")

    os.replace(tmp_path / "next" / "tls.crt", tmp_path / "tls.crt")  # the key is still the old one
    assert proc.served_certificate() == leaf_der(first)
    assert proc.request("GET", "/healthz")[0] == 200
    assert "previous certificate stays" in proc.stderr()

    (tmp_path / "tls.key").write_bytes((tmp_path / "next" / "tls.key").read_bytes())  # in place
    wait_until(lambda: proc.served_certificate() == leaf_der(second), timeout=5)


def test_a_missing_certificate_file_keeps_serving_then_loads_the_new_one(
    tmp_path: Path, ca: trustme.CA, started: list[InjectorProcess]
) -> None:
    first = write_leaf(ca, tmp_path)
    proc = InjectorProcess(ca, tmp_path / "tls.crt", tmp_path / "tls.key").start()
    started.append(proc)
    (tmp_path / "tls.crt").unlink()
    assert proc.served_certificate() == leaf_der(first)
    second = write_leaf(ca, tmp_path)
    assert proc.served_certificate() == leaf_der(second)
