"""Starting and stopping what the bench measures, all on 127.0.0.1: the fake upstream, redis,
the floor forwarder, the sidecar and the peers; free ports and readiness waits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench import BENCH, peers
from bench.procfs import process_tree
from bench.workload import ADMIN_TOKEN, BODY, KEY


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, timeout: float = 20.0) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:
                if response.status == 200:
                    return time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.002)
    raise TimeoutError(url)


def wait_port(port: int, timeout: float = 20.0) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return time.perf_counter() - started
        except OSError:
            time.sleep(0.002)
    raise TimeoutError(port)


def start_redis(port: int) -> subprocess.Popen[bytes]:
    """A throwaway redis-server, nothing saved; returns once it takes connections."""
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port)
    except BaseException:
        stop_all([proc])
        raise
    return proc


def start_upstream(port: int, module: str = "bench.upstream") -> subprocess.Popen[bytes]:
    """A zero-latency upstream: the OpenAI-shaped one (bench/upstream.py), or the Anthropic
    one (`module="bench.upstream_anthropic"`); returns once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port)], cwd=BENCH.parent)
    try:
        wait_port(port)
    except BaseException:
        stop_all([proc])
        raise
    return proc


def start_sidecar(
    config: Path, port: int, admin_port: int, workers: int, log: Path
) -> tuple[subprocess.Popen[bytes], float]:
    started = time.perf_counter()
    env = {**os.environ, "RINGSIDE_ADMIN_TOKEN": ADMIN_TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(config),
         "--port", str(port), "--admin-host", "127.0.0.1", "--admin-port", str(admin_port),
         "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=log.open("wb"), env=env,
    )  # fmt: skip
    wait_ready(f"http://127.0.0.1:{admin_port}/readyz")
    return proc, time.perf_counter() - started


def start_floor(port: int, upstream_url: str) -> tuple[subprocess.Popen[bytes], float]:
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.floor", "--port", str(port), "--upstream", upstream_url],
        cwd=BENCH.parent,
    )
    wait_port(port)
    return proc, time.perf_counter() - started


def start_peer(name: str, upstream_port: int, workdir: Path) -> peers.Peer | None:
    """Install (once) and start a peer; one that cannot be had here is left out, not fatal."""
    model = json.loads(BODY)["model"]
    try:
        return peers.start_peer(name, free_port(), upstream_port, model, KEY, workdir)
    except (peers.PeerError, OSError, subprocess.SubprocessError) as error:
        print(f"peer {name}: left out, {error}", file=sys.stderr, flush=True)
        return None


def wait_workers(pid: int, count: int, timeout: float = 20.0) -> None:
    """With --workers N > 1 the supervisor forks N workers; wait until all N are there."""
    if count == 1:
        return
    deadline = time.monotonic() + timeout
    while len(process_tree(pid)) < count + 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} workers of {pid}")
        time.sleep(0.05)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to all at once (each drains), then wait for each; kill what outlives 10 s."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def compile_sources() -> None:
    """Byte-compile the sidecar and the bench, as installing a package does (pip writes .pyc
    for what it installs, an editable install does not, and PYTHONDONTWRITEBYTECODE stops the
    import system from writing them): startup is then measured as it is deployed, not with
    every module compiled anew on each start."""
    import compileall

    for folder in (BENCH.parent / "sidecar", BENCH):
        compileall.compile_dir(str(folder), quiet=1)
