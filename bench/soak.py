"""Soak: normal traffic's latency alone, then while hostile clients run against the same sidecar.

A benchmark, not a test: it measures and prints, it does not pass or fail. Everything runs on
127.0.0.1. The sidecar runs the bench's realistic config (API key, budgeted and rate-limited
customer, memory store). Normal traffic is wrk at `--concurrency` (1) on the bench's chat request;
it runs alone, then beside each of three mixes:
  - the control: ordinary requests, a new connection each, at the pace of the paced hostile
    kinds below (5 loops at `--hostile-rate`): what any other traffic of that volume costs
    normal traffic's p99 on a single event loop, hostile or not;
  - the hostile mix without the big bodies, all at once:
    - silent connections and slowloris headers (a byte a second) — `--idle-connections` each;
    - streams whose client never reads — `--unread-streams`;
    - cascades of `limits.max_cascade` refs to a provider that refuses connections;
    - bodies nested 200 deep, CR/LF model refs, malformed HTTP (bare LF, NUL in a header);
  - the same with a fresh 15,000-property `response_format` schema per request (470-590 KB;
    refused for its size after it is parsed: the big body of the mix, parsed and checked in
    slices on the loop's background lane, sidecar/api/big_body.py and lane.py);
each request kind paced at `--hostile-rate` per second, so that what is measured is whether the
hostile requests stall the others, not the CPU share of their volume. `--kinds` keeps only some
hostile kinds (to tell which one costs what); `--hostile-nice` lowers the hostile clients'
priority on the load CPU they share with wrk and the upstream; the slowloris connections send
their bytes together, every second (the harsher pattern), unless `--spread`.
With 2 or more CPUs the sidecar gets one of its own and everything else the others (`--no-pin`
turns that off): what is measured is its event loop, not the scheduler. With `--rounds N` the
four runs are repeated N times, interleaved, and each figure is the median over the rounds
(every round's kept under "rounds"): on a machine others use too, one run's p99 measures them.
Each run also records `steal`, the share of CPU time the VM's host gave to others meanwhile.
Reported: normal traffic's requests/s, p50 and p99 alone and beside each mix, their ratios, the
hostile requests answered, and the sidecar's RSS.

    .venv/bin/python -m bench.soak --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import yaml

from bench import BENCH
from bench.processes import free_port, start_sidecar, start_upstream, stop_all
from bench.procfs import cpu_ticks, rss_mib, steal_share
from bench.targets import Target
from bench.workload import BODY, HEADERS, sidecar_config
from bench.wrk import run_wrk, wrk_script

HI = [{"role": "user", "content": "hi"}]
BAD_REF = json.dumps({"model": "fc:bench/x\r\nX-Evil: 1", "messages": HI})
DEEP = json.dumps({"model": "fc:bench/bench-model", "messages": HI, "x": []}).replace(
    "[]", "[" * 200 + "]" * 200
)


def hostile_config(path: Path) -> None:
    """The bench config plus a provider nobody listens on (for failing cascades)."""
    config = yaml.safe_load(path.read_text())
    config["providers"]["dead"] = {
        "kind": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1",
        "timeout": {"connect": 1, "read": 5}, "circuit": {"failures": 1_000_000, "cooldown": 1},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config, sort_keys=False))


KINDS = ("idle", "slowloris", "unread", "schema", "cascade", "deep", "bad_ref", "bare_lf", "nul")
_SERIAL = "S" * 9  # where each request's serial goes in the schema template


def _schema_template() -> bytes:
    properties = {f"p{_SERIAL}_{i}": {"type": "string"} for i in range(15_000)}
    schema = {"type": "object", "properties": properties}
    response_format = {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}}
    body = {"model": "fc:bench/bench-model", "messages": HI, "response_format": response_format}
    return json.dumps(body).encode()


SCHEMA_TEMPLATE = _schema_template()


def schema_body(serial: int) -> bytes:
    """A schema no earlier request sent (never cached), made with one bytes.replace: building
    it with json.dumps took ~20 ms of the load generator's CPU per request, from the cores the
    sidecar runs on."""
    return SCHEMA_TEMPLATE.replace(_SERIAL.encode(), b"%09d" % serial)


def cascade_body() -> str:
    refs = [f"fc:dead/m{i}" for i in range(8)]
    return json.dumps({"model": refs, "messages": [{"role": "user", "content": "hi"}]})


class Hostile:
    """The hostile clients, on their own event loop in a thread, until `stop`."""

    def __init__(
        self, port: int, args: argparse.Namespace, big_bodies: bool = True, ordinary: bool = False
    ) -> None:
        self.port, self.args, self.big_bodies = port, args, big_bodies
        self.ordinary = ordinary  # the control: ordinary requests at the hostile ones' pace
        self._spread = random.Random(16)
        self.pause = 1.0 / args.hostile_rate  # between one kind's requests: stalls, not volume
        self.answered: dict[str, int] = {}
        self.stopping = threading.Event()
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if self.args.hostile_nice:  # this thread only: wrk and the upstream preempt it
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.args.hostile_nice)
        asyncio.run(self._main())

    def stop(self) -> None:
        self.stopping.set()
        loop = self._event_loop
        if loop is not None and self._stopped is not None and not loop.is_closed():
            # a phase with none of the chosen kinds has ended its loop already
            with contextlib.suppress(RuntimeError):  # closed between the check and the call
                loop.call_soon_threadsafe(self._stopped.set)

    async def _held(self) -> None:
        """Until `stop`: a connection kept open and silent."""
        assert self._stopped is not None
        await self._stopped.wait()

    def _count(self, kind: str) -> None:
        self.answered[kind] = self.answered.get(kind, 0) + 1

    async def _post(self, body: str | bytes, kind: str, read: bool = True) -> None:
        payload = body if isinstance(body, bytes) else body.encode()
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items())
            + f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(head + payload)
            if not read:  # a stream nobody reads: hold the connection open
                await self._held()
                return
            if await reader.read(64):
                self._count(kind)
        finally:
            writer.close()

    async def _loop(self, body: Any, kind: str) -> None:
        serial = 0
        while not self.stopping.is_set():
            serial += 1
            with contextlib.suppress(OSError):
                await self._post(body(serial) if callable(body) else body, kind)
            await asyncio.sleep(self.pause)

    async def _idle(self, slow: bool) -> None:
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return
        try:
            if slow and self.args.spread:  # independent clients: their bytes do not coincide
                await asyncio.sleep(self._spread.random())
            for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" if slow else b"":
                if self.stopping.is_set():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(1.0)
            await self._held()
        except OSError:
            pass
        finally:
            writer.close()

    async def _raw(self, data: bytes, kind: str) -> None:
        while not self.stopping.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(data)
                if await reader.read(64):
                    self._count(kind)
                writer.close()
            except OSError:
                pass
            await asyncio.sleep(self.pause)

    async def _main(self) -> None:
        self._event_loop, self._stopped = asyncio.get_running_loop(), asyncio.Event()
        stream = json.dumps({**json.loads(BODY), "stream": True})
        made: dict[str, Callable[[], list[Coroutine[Any, Any, None]]]] = {
            "idle": lambda: [self._idle(slow=False) for _ in range(self.args.idle_connections)],
            "slowloris": lambda: [self._idle(slow=True) for _ in range(self.args.idle_connections)],
            "unread": lambda: [
                self._post(stream, "unread", read=False) for _ in range(self.args.unread_streams)
            ],
            "schema": lambda: [self._loop(schema_body, "schema")] if self.big_bodies else [],
            "cascade": lambda: [self._loop(cascade_body(), "cascade")],
            "deep": lambda: [self._loop(DEEP, "deep")],
            "bad_ref": lambda: [self._loop(BAD_REF, "bad_ref")],
            "bare_lf": lambda: [self._raw(b"GET / HTTP/1.1\nHost: x\n\n", "bare_lf")],
            "nul": lambda: [self._raw(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", "nul")],
        }
        if self.ordinary:  # as many loops as the paced hostile kinds, each a valid request
            # (cascade, deep, bad_ref, bare_lf, nul: each a new connection per request)
            made = {"ordinary": lambda: [self._loop(BODY, "ordinary") for _ in range(5)]}
        chosen = self.args.kinds if self.args.kinds and not self.ordinary else list(made)
        tasks = [task for kind in chosen for task in made[kind]()]
        await asyncio.gather(*(asyncio.ensure_future(t) for t in tasks), return_exceptions=True)


def pin(sidecar_pid: int, load_pids: list[int]) -> tuple[set[int], set[int]] | None:
    """The sidecar on the first CPU this process may use; this process (the hostile clients),
    `load_pids` (the upstream) and every later child (wrk) on the others. Without it, on 2
    cores, the sidecar's p99 under the mix measures the scheduler sharing its core with 4 busy
    processes, not whether its event loop stalled. None on a machine with a single CPU."""
    mine = os.sched_getaffinity(0)
    if len(mine) < 2:
        return None
    sidecar_cpus = {min(mine)}
    load_cpus = mine - sidecar_cpus
    for pid, cpus in [(sidecar_pid, sidecar_cpus), *((p, load_cpus) for p in load_pids)]:
        for task in Path(f"/proc/{pid}/task").iterdir():  # its threads too
            os.sched_setaffinity(int(task.name), cpus)
    os.sched_setaffinity(0, load_cpus)
    return sidecar_cpus, load_cpus


PHASES = ("alone", "beside_ordinary_traffic", "under_mix_without_big_bodies", "under_hostile_mix")


def kinds_list(text: str) -> list[str]:
    """`--kinds`: hostile kinds by name, each one known."""
    kinds = [kind for kind in text.split(",") if kind]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown kinds {unknown}: choose from {KINDS}")
    return kinds


def measured_run(target: Target, script: Path, args: argparse.Namespace) -> dict[str, float]:
    """One wrk run of normal traffic, with the share of CPU the VM's host stole meanwhile."""
    before = cpu_ticks()
    run = run_wrk(target, script, args.concurrency, args.seconds)
    return {**run, "steal": round(steal_share(before, cpu_ticks()), 4)}


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure of wrk's runs, its median over them."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    # 1: latency with the sidecar's core mostly idle; at 8 wrk alone keeps it saturated, and then
    # any added work, hostile or not, shows in p99 as queueing
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--idle-connections", type=int, default=200)
    parser.add_argument("--unread-streams", type=int, default=50)
    parser.add_argument("--hostile-rate", type=float, default=20.0, help="requests/s per kind")
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false",
        help="do not give the sidecar a core of its own (the load on the others)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat the three runs, interleaved; medians"
    )
    parser.add_argument(
        "--kinds", default=[], type=kinds_list,
        help=f"comma-separated hostile kinds ({', '.join(KINDS)}); all by default",
    )  # fmt: skip
    parser.add_argument(
        "--spread", action="store_true",
        help="spread the slowloris connections' bytes over each second (by default they are "
        "sent together: 200 bytes on 200 connections at once, every second)",
    )  # fmt: skip
    parser.add_argument(
        "--hostile-nice", type=int, default=0,
        help="nice value of the hostile clients' thread (on the load CPU, beside wrk and the "
        "upstream)",
    )  # fmt: skip
    parser.add_argument("--out", default=str(BENCH / "results" / "soak.json"))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ringside-soak-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up_port = free_port()
        procs.append(start_upstream(up_port))
        config = sidecar_config(up_port, "memory", workdir, "", name="soak")
        hostile_config(config)
        port, admin = free_port(), free_port()
        proc, _ = start_sidecar(config, port, admin, 1, workdir / "sidecar.log")
        procs.append(proc)
        pinned = pin(proc.pid, [procs[0].pid]) if args.pin else None
        target = Target("sidecar", f"http://127.0.0.1:{port}/v1/chat/completions", proc.pid)
        script = wrk_script(HEADERS, workdir / "post.lua")
        run_wrk(target, script, args.concurrency, 2)  # warm-up
        rss_idle = rss_mib(proc.pid)
        target.rss_load = 0.0
        rounds: list[dict[str, Any]] = []
        for _ in range(args.rounds):
            measured: dict[str, Any] = {
                "alone": measured_run(target, script, args),
                "hostile_answered": {},
            }
            for phase, big_bodies in (
                ("beside_ordinary_traffic", False),
                ("under_mix_without_big_bodies", False),
                ("under_hostile_mix", True),
            ):
                hostile = Hostile(port, args, big_bodies, phase == "beside_ordinary_traffic")
                hostile.thread.start()
                time.sleep(2)  # the hostile mix in full swing
                measured[phase] = measured_run(target, script, args)
                hostile.stop()
                hostile.thread.join(30)
                measured["hostile_answered"][phase] = hostile.answered
                time.sleep(2)
            rounds.append(measured)
        phases = {phase: median_run([r[phase] for r in rounds]) for phase in PHASES}
        alone, mixed = phases["alone"], phases["under_hostile_mix"]
        answered = rounds[-1]["hostile_answered"]
        result = {
            **phases,
            "p99_ratio": mixed["p99_ms"] / alone["p99_ms"],
            "p99_ratio_beside_ordinary": (
                phases["beside_ordinary_traffic"]["p99_ms"] / alone["p99_ms"]
            ),
            "p99_ratio_without_big_bodies": (
                phases["under_mix_without_big_bodies"]["p99_ms"] / alone["p99_ms"]
            ),
            "rps_ratio": mixed["rps"] / alone["rps"],
            "hostile_answered": answered,
            "rss_mib": {
                "idle": rss_idle,
                "peak_under_mix": target.rss_load,
                "after": rss_mib(proc.pid),
            },
            "sidecar_cpus": sorted(pinned[0]) if pinned else None,
            "load_cpus": sorted(pinned[1]) if pinned else None,
            "args": vars(args),
            "rounds": rounds if args.rounds > 1 else None,
        }
        print(json.dumps(result, indent=2))
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        stop_all(procs)
        shutil.rmtree(workdir, ignore_errors=True)  # its config and the sidecar's log
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
