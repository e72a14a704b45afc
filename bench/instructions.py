"""CPU work per request as a count of machine instructions, under valgrind's callgrind.

CPU seconds from /proc move with the machine: the same code measured 1.15–1.65× the floor on
2-core machines of one kind, run to run and machine to machine, because cache sizes, noisy
neighbours and the cost of a syscall differ. An instruction count does not: callgrind counts
what the process executes in user space, the same for the same code and inputs whatever else
the machine is doing (kernel time is not in it). Each proxy runs under callgrind with its
counting off through startup and a warm-up; it is switched on (`callgrind_control -i on`)
for a wrk run at fixed concurrency, then off, and the count is divided by the requests wrk
saw answered. The requests in flight at the two switches make the figure uncertain by about
concurrency / requests (±1–2 % here). Valgrind runs the proxy about 50× slower, so this is
no measure of speed, only of work. `measure_instructions` counts the floor's and the
memory-store sidecar's for `bench.run`, the same sidecar's on the Anthropic path, and the
sqlite- and redis-store sidecars' when the run has those stores (redis-server's own work is
not in the redis figure: the bench reports its CPU per request beside it). With `stream`, each
is sent the streamed body instead (a 20-chunk stream a request): `python -m bench.instructions
--stream` counts the floor and the memory sidecar that way on an upstream of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from bench.processes import free_port, start_upstream, stop_all, wait_port, wait_ready
from bench.targets import ANTHROPIC_PATH
from bench.workload import (
    ADMIN_TOKEN,
    ANTHROPIC_BODY,
    BODY,
    HEADERS,
    sidecar_config,
    stream_body,
)
from bench.wrk import wrk_script

CONCURRENCY = 16
SQLITE_PATH = "sidecar (sqlite)"
REDIS_PATH = "sidecar (redis)"
WARMUP_SECONDS = 3


def available() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


def _total(dump_prefix: Path) -> int:
    """The instruction total of callgrind's dumps (`summary:` / `totals:` lines)."""
    total = 0
    for dump in dump_prefix.parent.glob(dump_prefix.name + "*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total


def _wrk(url: str, script: Path, seconds: float) -> int:
    out = subprocess.run(
        ["wrk", "-t", "1", "-c", str(CONCURRENCY), "-d", f"{max(1, round(seconds))}s",
         "--timeout", "30s", "-s", str(script), url],
        capture_output=True, text=True, timeout=seconds + 120,
    )  # fmt: skip
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("{")), None)
    if line is None:
        raise RuntimeError(f"wrk against {url} failed:\n{out.stdout}\n{out.stderr}")
    result = json.loads(line)
    return int(result["requests"] - result["non2xx"])


class Served(NamedTuple):
    """A process to count: its command, a wait until it serves, and its chat URL."""

    command: list[str]
    ready: Callable[[], object]
    url: str


def floor_process(upstream_url: str) -> Served:
    """bench/floor.py on a free port, forwarding to `upstream_url`."""
    port = free_port()
    return Served(
        [sys.executable, "-m", "bench.floor", "--port", str(port), "--upstream", upstream_url],
        partial(wait_port, port, 180.0),
        f"http://127.0.0.1:{port}/v1/chat/completions",
    )


def sidecar_process(config: Path) -> Served:
    """`ringside serve` of `config` on free ports (its env needs RINGSIDE_ADMIN_TOKEN)."""
    port, admin = free_port(), free_port()
    return Served(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(config),
         "--port", str(port), "--admin-host", "127.0.0.1", "--admin-port", str(admin)],
        partial(wait_ready, f"http://127.0.0.1:{admin}/readyz", 180.0),
        f"http://127.0.0.1:{port}/v1/chat/completions",
    )  # fmt: skip


def count(
    served: Served,
    script: Path,
    seconds: float,
    workdir: Path,
    name: str,
    env: dict[str, str] | None = None,
) -> dict[str, float]:
    """Instructions per answered request of `served`, under wrk for `seconds`."""
    return count_load(
        served,
        partial(_wrk, served.url, script, WARMUP_SECONDS),
        partial(_wrk, served.url, script, seconds),
        workdir, name, env,
    )  # fmt: skip


def count_load(
    served: Served,
    warm_up: Callable[[], object],
    load: Callable[[], int],
    workdir: Path,
    name: str,
    env: dict[str, str] | None = None,
    settle: float = 0.0,
) -> dict[str, float]:
    """Instructions per answered request of the process `served` starts: counting is off through
    its start and `warm_up`, on for `load` (which returns how many requests were answered).
    `settle` seconds of quiet before and after the load keep the warm-up's trailing work (usage
    records, metrics) out of the count and the load's own in it."""
    dump = workdir / f"callgrind-{name}.out"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={dump}",
         *served.command],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    try:
        served.ready()
        warm_up()
        time.sleep(settle)
        control = ["callgrind_control", "-i"]
        subprocess.run([*control, "on", str(proc.pid)], capture_output=True, check=True)
        answered = load()
        time.sleep(settle)
        subprocess.run([*control, "off", str(proc.pid)], capture_output=True, check=True)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True)
        time.sleep(1.0)  # the dump is written by the process itself
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    total = _total(dump)
    return {"instructions_per_req": total / max(1, answered), "requests": answered}


def measure_instructions(
    up_port: int,
    upstream_url: str,
    workdir: Path,
    seconds: float,
    anthropic_port: int | None = None,
    stores: tuple[str, ...] = (),
    redis_url: str = "",
    stream: bool = False,
) -> dict[str, Any]:
    """Instructions per request of the floor and of the memory-store sidecar, under callgrind
    (count(), above): the machine-independent form of "CPU vs floor". With `anthropic_port`
    (bench/upstream_anthropic.py's), also the memory sidecar answering through an `anthropic`
    provider (ANTHROPIC_PATH), over the same floor (a forwarder to the OpenAI upstream). With
    "sqlite" in `stores`, also the sqlite-store sidecar (its store's work is on the event loop
    and the connection's thread, both counted: callgrind counts every thread). With "redis" in
    `stores` and `redis_url` (a database of its own: its books are not the main run's), also
    the redis-store sidecar. With `stream`, every one is sent its body asking for a stream."""
    body = stream_body(BODY) if stream else BODY
    script = wrk_script(HEADERS, workdir / "instructions.lua", body)
    floor = count(floor_process(upstream_url), script, seconds, workdir, "floor")
    _say("floor", floor)
    config = sidecar_config(up_port, "memory", workdir, "", name="instructions")
    sidecar = _count_sidecar(config, script, seconds, workdir, "sidecar")
    _say("sidecar (memory)", sidecar)
    counted: dict[str, Any] = {
        "floor": floor,
        "sidecar (memory)": sidecar,
        "ratio": sidecar["instructions_per_req"] / floor["instructions_per_req"],
        "concurrency": CONCURRENCY,
        "seconds": seconds,
        "stream": stream,
    }
    if "sqlite" in stores:
        config = sidecar_config(up_port, "sqlite", workdir, "", name="instructions-sqlite")
        on_sqlite = _count_sidecar(config, script, seconds, workdir, "sidecar-sqlite")
        _say(SQLITE_PATH, on_sqlite)
        counted[SQLITE_PATH] = on_sqlite
        counted["sqlite_ratio"] = on_sqlite["instructions_per_req"] / floor["instructions_per_req"]
    if "redis" in stores and redis_url:
        config = sidecar_config(up_port, "redis", workdir, redis_url, name="instructions-redis")
        on_redis = _count_sidecar(config, script, seconds, workdir, "sidecar-redis")
        _say(REDIS_PATH, on_redis)
        counted[REDIS_PATH] = on_redis
        counted["redis_ratio"] = on_redis["instructions_per_req"] / floor["instructions_per_req"]
    if anthropic_port is not None:
        config = sidecar_config(
            up_port, "memory", workdir, "", "instructions-anthropic", anthropic_port
        )
        body = stream_body(ANTHROPIC_BODY) if stream else ANTHROPIC_BODY
        script = wrk_script(HEADERS, workdir / "instructions-anthropic.lua", body)
        anthropic = _count_sidecar(config, script, seconds, workdir, "sidecar-anthropic")
        _say(ANTHROPIC_PATH, anthropic)
        counted[ANTHROPIC_PATH] = anthropic
        counted["anthropic_ratio"] = (
            anthropic["instructions_per_req"] / floor["instructions_per_req"]
        )
        counted["anthropic_vs_openai_path"] = (
            anthropic["instructions_per_req"] / sidecar["instructions_per_req"]
        )
    return counted


def _count_sidecar(
    config: Path, script: Path, seconds: float, workdir: Path, name: str
) -> dict[str, float]:
    env = {**os.environ, "RINGSIDE_ADMIN_TOKEN": ADMIN_TOKEN}
    return count(sidecar_process(config), script, seconds, workdir, name, env)


def _say(name: str, counted: dict[str, float]) -> None:
    print(f"instructions {name:<28} {counted['instructions_per_req']:9.0f} per request "
          f"({counted['requests']:.0f} requests)", flush=True)  # fmt: skip


def main() -> None:
    """The floor's and the memory sidecar's count alone, on an upstream of their own."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the counted run")
    parser.add_argument("--stream", action="store_true", help="a 20-chunk stream a request")
    parser.add_argument("--keep", type=Path, help="a directory to keep callgrind's dumps in")
    args = parser.parse_args()
    up_port = free_port()
    upstream = start_upstream(up_port)
    try:
        with tempfile.TemporaryDirectory(prefix="ringside-instructions-") as temporary:
            workdir = args.keep or Path(temporary)
            workdir.mkdir(parents=True, exist_ok=True)
            url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
            counted = measure_instructions(up_port, url, workdir, args.seconds, stream=args.stream)
        print(f"ratio {counted['ratio']:.3f}", flush=True)
    finally:
        stop_all([upstream])


if __name__ == "__main__":
    main()
