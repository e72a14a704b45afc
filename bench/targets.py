"""The paths under test: `Target` holds one path's process and samples; `start_targets` starts
the main run's set (direct, the floor, a sidecar per store, the memory sidecar's Anthropic
path, the peers), and after the load
`stop_proxies` and `measure_startups` stop them and time more starts of each."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from bench.processes import free_port, start_floor, start_peer, start_sidecar, stop_all
from bench.workload import ANTHROPIC_BODY, BODY, HEADERS, sidecar_config

STARTUP_SAMPLES = 5  # starts of the floor and of each sidecar; the median is reported
ANTHROPIC_PATH = "sidecar (memory, anthropic)"  # the memory sidecar, its model on `anthropic`


@dataclass
class Target:
    name: str
    url: str  # …/v1/chat/completions
    pid: int | None  # the proxy process (None for direct)
    proc: subprocess.Popen[bytes] | None = None
    startup_s: float | None = None
    rss_idle: float | None = None
    runs: dict[int, list[dict[str, float]]] = field(default_factory=dict)
    ttfb_ms: list[float] = field(default_factory=list)
    ttfb_direct_ms: list[float] = field(default_factory=list)  # direct, paired with ttfb_ms
    stream_runs: list[dict[str, float]] = field(default_factory=list)
    rss_load: float = 0.0
    headers: dict[str, str] = field(default_factory=lambda: dict(HEADERS))
    body: str = BODY  # what wrk and the TTFB client send (streamed: workload.stream_body)
    store: str | None = None  # a sidecar's store backend
    store_pid: int | None = None  # a redis sidecar's redis-server: its CPU per request too
    admin_url: str | None = None  # the sidecar's admin listener, for the ledger check
    restart: Callable[[], tuple[subprocess.Popen[bytes], float]] | None = None  # another copy
    startups: list[float] = field(default_factory=list)  # startup samples after the first
    answered: int = 0  # requests the clients saw answered 2xx (warm-ups included)
    cut: int = 0  # requests possibly served but not seen: in flight when a wrk run ended


def start_targets(
    procs: list[subprocess.Popen[bytes]],
    up_port: int,
    upstream_url: str,
    stores: list[str],
    workers: int,
    wanted_peers: list[str],
    workdir: Path,
    redis_url: str,
    anthropic_port: int | None = None,
) -> tuple[list[Target], dict[str, str]]:
    """Direct (first), the floor, a sidecar per store and each peer that can be had, and the
    peers' one-line descriptions. With `anthropic_port` (bench/upstream_anthropic.py's) and
    the memory store, one more memory sidecar, right after the first, whose requests name a
    model on an `anthropic` provider: the Anthropic path (ANTHROPIC_PATH). Every process
    started is appended to `procs` at once, so that the caller stops it whatever fails later."""
    described: dict[str, str] = {}
    targets = [Target("direct", upstream_url, None)]

    floor_port = free_port()
    floor, startup = start_floor(floor_port, upstream_url)
    procs.append(floor)
    targets.append(
        Target(
            "floor",
            f"http://127.0.0.1:{floor_port}/v1/chat/completions",
            floor.pid,
            floor,
            startup,
            restart=partial(start_floor, free_port(), upstream_url),
        )
    )
    for store in stores:
        config = sidecar_config(up_port, store, workdir, redis_url)
        targets.append(_sidecar(procs, f"sidecar ({store})", store, config, workers, workdir))
        if store == "memory" and anthropic_port is not None:
            config = sidecar_config(
                up_port, store, workdir, redis_url, "memory-anthropic", anthropic_port
            )
            sidecar = _sidecar(procs, ANTHROPIC_PATH, store, config, workers, workdir)
            sidecar.body = ANTHROPIC_BODY
            targets.append(sidecar)
    for name in wanted_peers:
        if peer := start_peer(name, up_port, workdir):
            procs.append(peer.proc)
            described[name] = peer.description
            targets.append(
                Target(
                    f"peer ({name})",
                    peer.url,
                    peer.proc.pid,
                    peer.proc,
                    peer.startup_s,
                    headers=peer.headers,
                )
            )
    return targets, described


def _sidecar(
    procs: list[subprocess.Popen[bytes]],
    name: str,
    store: str,
    config: Path,
    workers: int,
    workdir: Path,
) -> Target:
    """A sidecar on `config`, started (and appended to `procs`), as a Target."""
    port, admin = free_port(), free_port()
    proc, startup = start_sidecar(config, port, admin, workers, workdir / f"{config.stem}.log")
    procs.append(proc)
    restart_log = workdir / f"{config.stem}-restart.log"
    return Target(
        name,
        f"http://127.0.0.1:{port}/v1/chat/completions",
        proc.pid,
        proc,
        startup,
        store=store,
        admin_url=f"http://127.0.0.1:{admin}",
        restart=partial(start_sidecar, config, free_port(), free_port(), workers, restart_log),
    )


def stop_proxies(targets: list[Target]) -> None:
    """The load is over: stop every proxy (the upstream and redis stay) and wait for them."""
    stop_all([target.proc for target in targets if target.proc is not None])


def measure_startups(targets: list[Target]) -> None:
    """More startup samples, interleaved, on an idle machine: one start is at the mercy of
    whatever else the machine does in that quarter second. The median of all is reported."""
    for _ in range(STARTUP_SAMPLES - 1):
        for target in targets:
            if target.restart is None:
                continue
            proc, seconds = target.restart()
            target.startups.append(seconds)
            stop_all([proc])
