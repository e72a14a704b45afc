"""One command for the whole benchmark: `python -m bench.run` (see bench/README.md).

Starts on loopback a zero-latency upstream, the floor forwarder and the sidecar on a realistic
config (key auth, a budgeted customer with a rate limit, metrics, usage records) for each store,
drives each with wrk at several concurrencies in interleaved rounds, and reports medians:
requests/s, p50/p99 latency, latency added over direct, CPU µs per request of the proxy's
process tree, stream time-to-first-byte, RSS idle and under load, startup time to /readyz.
With --peer, the LiteLLM proxy and/or the Portkey gateway on the same upstream (bench/peers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from bench import cores, instructions, peers

BENCH = Path(__file__).resolve().parent
KEY = "rk_bench_secret_key"
BODY = json.dumps(
    {
        "model": "fc:bench/bench-model",
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Say something about foxes in one short sentence."},
        ],
        "max_tokens": 64,
    }
)
STREAM_BODY = json.dumps({**json.loads(BODY), "stream": True})
TTFB_WARMUP = 5  # streamed requests per target before TTFB samples are kept
STREAM_CONCURRENCY = 16  # streamed wrk runs: 20-chunk SSE answers, at one concurrency
SCALING_CONCURRENCY = 64  # the --workers scaling run
STARTUP_SAMPLES = 5  # starts of the floor and of each sidecar; the median is reported
CUSTOMER = "acme"
ADMIN_TOKEN = "bench-admin-token"
HEADERS = {"Authorization": f"Bearer {KEY}", "FC-Customer": CUSTOMER}  # the sidecar's, and direct's
TICKS = os.sysconf("SC_CLK_TCK")


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


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return pids


def cpu_seconds(pid: int) -> float:
    total = 0
    for each in process_tree(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def rss_mib(pid: int) -> float:
    total = 0
    for each in process_tree(pid):
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


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
    store: str | None = None  # a sidecar's store backend
    admin_url: str | None = None  # the sidecar's admin listener, for the ledger check
    restart: Callable[[], tuple[subprocess.Popen[bytes], float]] | None = None  # another copy
    startups: list[float] = field(default_factory=list)  # startup samples after the first
    answered: int = 0  # requests the clients saw answered 2xx (warm-ups included)
    cut: int = 0  # requests possibly served but not seen: in flight when a wrk run ended


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
%s
done = function(summary, latency, requests)
  io.write(string.format('{"requests": %%d, "duration_us": %%d, "errors": %%d, "non2xx": %%d, ' ..
    '"p50_us": %%d, "p99_us": %%d}\\n', summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_script(headers: dict[str, str], path: Path, body: str = BODY) -> Path:
    """One Lua script per target: the body is the same, the headers are the target's own."""
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    path.write_text(WRK_SCRIPT % (body, lines))
    return path


def run_wrk(target: Target, script: Path, connections: int, seconds: float) -> dict[str, float]:
    threads = 1 if connections < 4 else 2
    before = cpu_seconds(target.pid) if target.pid else 0.0
    sampler_stop = threading.Event()

    def sample_rss() -> None:
        while not sampler_stop.wait(0.25):
            if target.pid:
                target.rss_load = max(target.rss_load, rss_mib(target.pid))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
         "--timeout", "10s", "-s", str(script), target.url],
        capture_output=True, text=True, timeout=seconds + 60,
    )  # fmt: skip
    sampler_stop.set()
    sampler.join()
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("{")), None)
    if line is None:
        raise RuntimeError(f"wrk against {target.name} failed:\n{out.stdout}\n{out.stderr}")
    result = json.loads(line)
    target.answered += result["requests"] - result["non2xx"]
    target.cut += connections + result["errors"]
    cpu = (cpu_seconds(target.pid) - before) if target.pid else 0.0
    requests = max(1, result["requests"])
    return {
        "rps": requests / (result["duration_us"] / 1e6),
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "cpu_us_per_req": cpu * 1e6 / requests,
        "errors": result["errors"] + result["non2xx"],
    }


async def measure_ttfb(targets: list[Target], count: int) -> None:
    """Time to the first body byte of a streamed answer, one request at a time, each proxy
    paired with direct: `count` times a request straight to the upstream, then one through
    the proxy. The added TTFB is the proxy's median over the median of its own direct
    samples, taken under the same machine state a moment apart (a proxy timed in a block of
    its own, minutes from direct, or right after a heavyweight peer has run, measures the
    machine as much as itself). The first few pairs warm connections and are dropped."""
    import aiohttp

    body = json.loads(BODY)
    body["stream"] = True
    direct, proxies = targets[0], targets[1:]

    async def sample(session: aiohttp.ClientSession, target: Target) -> float | None:
        started = time.perf_counter()
        async with session.post(target.url, json=body, headers=target.headers) as reply:
            await reply.content.readany()
            elapsed_ms = (time.perf_counter() - started) * 1000
            await reply.read()
        target.answered += reply.status == 200
        return elapsed_ms if reply.status == 200 else None

    async with aiohttp.ClientSession() as session:
        for target in proxies:
            for index in range(count + TTFB_WARMUP):
                base, through = await sample(session, direct), await sample(session, target)
                if index >= TTFB_WARMUP and base is not None and through is not None:
                    target.ttfb_direct_ms.append(base)
                    target.ttfb_ms.append(through)
                    direct.ttfb_ms.append(base)


def ledger(target: Target) -> dict[str, Any]:
    """After the load: does the store's books balance? Read the bench customer's usage from
    the admin API once nothing is held any more (requests cut off at the end of a wrk run
    settle a moment later): every request the clients saw answered has its usage record, the
    budget's spent total is the sum of the records' costs, and no reservation is left held.
    The memory store keeps only its latest records, so only the last check applies to it."""
    assert target.admin_url is not None and target.store is not None
    request = urllib.request.Request(
        f"{target.admin_url}/v1/customers/{CUSTOMER}/usage",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(request, timeout=30) as reply:
            usage = json.loads(reply.read())
        if usage["reserved_usd"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    entry: dict[str, Any] = {
        "answered": target.answered,
        "cut": target.cut,
        "records": usage["requests"],
        "spent_usd": usage["spent_usd"],
        "records_cost_usd": usage["cost_usd"],
        "held_usd": usage["reserved_usd"],
    }
    held_none = usage["reserved_usd"] == 0
    if target.store == "memory":
        entry["exact"] = held_none
        entry["note"] = "memory store: only its latest usage records are kept"
        return entry
    records_match = target.answered <= usage["requests"] <= target.answered + target.cut
    spend_matches = abs(usage["spent_usd"] - usage["cost_usd"]) < 1e-9
    entry["exact"] = held_none and records_match and spend_matches
    return entry


def sidecar_config(
    upstream_port: int, store: str, workdir: Path, redis_url: str, name: str = ""
) -> Path:
    """The sidecar's config; `name` (default: the store) names its files, so that several
    sidecars on one store kind keep separate books."""
    name = name or store
    storage: dict[str, Any] = {"backend": store}
    if store == "sqlite":
        storage["sqlite_path"] = str(workdir / f"{name}.db")
    if store == "redis":
        storage["redis_url"] = redis_url
    config = {
        "storage": storage,
        "providers": {
            "bench": {
                "kind": "openai",
                "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                "timeout": {"connect": 2, "read": 30},
            }
        },
        "models": {
            "fc:bench/bench-model": {
                "input_per_mtok": 0.15,
                "output_per_mtok": 0.60,
                "context": 128000,
                "max_output": 4096,
            }
        },
        "keys": [
            {"id": "bench", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "developer": "b"}
        ],
        "customers": {
            CUSTOMER: {
                "budget": {"usd": 1_000_000, "period": "month"},
                "rate_limit": {"rpm": 100_000_000, "tpm": 2_000_000_000},
            }
        },
        "access_log": {"enabled": False},
    }
    path = workdir / f"sidecar-{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


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


def compile_sources() -> None:
    """Byte-compile the sidecar and the bench, as installing a package does (pip writes .pyc
    for what it installs, an editable install does not, and PYTHONDONTWRITEBYTECODE stops the
    import system from writing them): startup is then measured as it is deployed, not with
    every module compiled anew on each start."""
    import compileall

    for folder in (BENCH.parent / "sidecar", BENCH):
        compileall.compile_dir(str(folder), quiet=1)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(targets: list[Target], concurrencies: list[int]) -> dict[str, Any]:
    direct = targets[0]
    floor = next(t for t in targets if t.name == "floor")
    out: dict[str, Any] = {}
    for target in targets:
        entry: dict[str, Any] = {
            "startup_s": None
            if target.startup_s is None
            else median([target.startup_s, *target.startups]),
            "rss_idle_mib": target.rss_idle,
            "rss_load_mib": target.rss_load or None,
            "stream_ttfb_ms_p50": median(target.ttfb_ms),
            "stream_ttfb_added_ms": None
            if target is direct
            else median(target.ttfb_ms) - median(target.ttfb_direct_ms),
        }
        for c in concurrencies:
            runs = target.runs[c]
            entry[f"c{c}"] = {
                key: median([run[key] for run in runs])
                for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "errors")
            }
            base = median([run["p50_ms"] for run in direct.runs[c]])
            base99 = median([run["p99_ms"] for run in direct.runs[c]])
            entry[f"c{c}"]["added_p50_ms"] = entry[f"c{c}"]["p50_ms"] - base
            entry[f"c{c}"]["added_p99_ms"] = entry[f"c{c}"]["p99_ms"] - base99
        if target.stream_runs:
            entry["stream"] = {
                key: median([run[key] for run in target.stream_runs])
                for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "errors")
            }
        out[target.name] = entry
    floor_cpu = out["floor"][f"c{concurrencies[-1]}"]["cpu_us_per_req"]
    for target in targets:
        if target.pid and target.name != "floor":
            cpu = out[target.name][f"c{concurrencies[-1]}"]["cpu_us_per_req"]
            out[target.name]["cpu_vs_floor"] = cpu / floor_cpu if floor_cpu else None
            if "stream" in out[target.name] and "stream" in out["floor"]:
                out[target.name]["stream"]["cpu_vs_floor"] = ratio(
                    out[target.name]["stream"]["cpu_us_per_req"],
                    out["floor"]["stream"]["cpu_us_per_req"],
                )
    del floor
    add_vs_sidecar(out, concurrencies)
    return out


def ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def add_vs_sidecar(out: dict[str, Any], concurrencies: list[int]) -> None:
    """Each peer over the memory-store sidecar (else the first store run), in the same run."""
    sidecars = [name for name in out if name.startswith("sidecar (")]
    if not sidecars:
        return
    base_name = "sidecar (memory)" if "sidecar (memory)" in sidecars else sidecars[0]
    base = out[base_name]
    for name, entry in out.items():
        if not name.startswith("peer ("):
            continue
        entry["vs_sidecar"] = {
            "sidecar": base_name,
            "rss_idle": ratio(entry["rss_idle_mib"], base["rss_idle_mib"]),
            "startup": ratio(entry["startup_s"], base["startup_s"]),
            **{
                f"c{c}": {
                    key: ratio(entry[f"c{c}"][key], base[f"c{c}"][key])
                    for key in ("rps", "cpu_us_per_req")
                }
                for c in concurrencies
            },
        }


def markdown(results: dict[str, Any], meta: dict[str, Any], concurrencies: list[int]) -> str:
    top = concurrencies[-1]
    lines = [
        f"Measured {meta['date']} on {meta['machine']} ({meta['cpus']} cores), Python "
        f"{meta['python']}, wrk, {meta['rounds']} interleaved rounds of {meta['seconds']} s, "
        "medians. Zero-latency upstream on loopback; the sidecar as "
        + ("one process" if meta.get("workers", 1) == 1 else f"{meta['workers']} workers")
        + " with key auth, a budgeted and rate-limited customer, metrics and usage records.",
        "",
        "| path | rps c=1 | rps c=16 | rps c=64 | p50 / p99 c=1 (ms) | added p50 / p99 c=1 (ms) "
        f"| CPU µs/req c={top} | CPU vs floor | RSS idle / load (MiB) | startup (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results.items():
        c1 = entry.get("c1")  # absent when --concurrency leaves out 1
        cells = [
            name,
            *(f"{entry[f'c{c}']['rps']:.0f}" if f"c{c}" in entry else "—" for c in (1, 16, 64)),
            "—" if c1 is None else f"{c1['p50_ms']:.3f} / {c1['p99_ms']:.3f}",
            "—"
            if name == "direct" or c1 is None
            else f"{c1['added_p50_ms']:.3f} / {c1['added_p99_ms']:.3f}",
            "—" if name == "direct" else f"{entry[f'c{top}']['cpu_us_per_req']:.0f}",
            f"{entry['cpu_vs_floor']:.2f}×" if entry.get("cpu_vs_floor") else "—",
            "—"
            if name == "direct"
            else f"{entry['rss_idle_mib']:.0f} / {entry['rss_load_mib']:.0f}",
            "—" if entry["startup_s"] is None else f"{entry['startup_s']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    tables = stream_lines(results) + ledger_lines(results) + peer_lines(results, meta, top)
    return "\n".join(lines + tables) + "\n"


def stream_lines(results: dict[str, Any]) -> list[str]:
    """The streamed answers (20 chunks each) under load: a table of their own."""
    if not any("stream" in entry for entry in results.values()):
        return []
    lines = [
        "",
        f"Streamed answers (20 content chunks + usage + [DONE]), wrk at c={STREAM_CONCURRENCY}:",
        "",
        "| path | streams/s | p50 / p99 (ms) | CPU µs/stream | CPU vs floor "
        "| TTFB added, c=1 (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in results.items():
        stream = entry.get("stream")
        if stream is None:
            continue
        cells = [
            name,
            f"{stream['rps']:.0f}",
            f"{stream['p50_ms']:.3f} / {stream['p99_ms']:.3f}",
            "—" if name == "direct" else f"{stream['cpu_us_per_req']:.0f}",
            times(stream.get("cpu_vs_floor")),
            "—" if name == "direct" else f"{entry['stream_ttfb_added_ms']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ledger_lines(results: dict[str, Any]) -> list[str]:
    """The books after the load, per store (see ledger())."""
    rows = {name: entry["ledger"] for name, entry in results.items() if "ledger" in entry}
    if not rows:
        return []
    lines = [
        "",
        'The books after the run (customer usage from the admin API; "cut": requests in '
        "flight when a wrk run ended, served or not):",
        "",
        "| path | answered 2xx (+ cut) | usage records | spent (USD) | Σ record cost (USD) "
        "| held (USD) | exact? |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        cells = [
            name,
            f"{row['answered']} (+ ≤ {row['cut']})",
            f"{row['records']}" + (" (latest only)" if "note" in row else ""),
            f"{row['spent_usd']:.9f}",
            "—" if "note" in row else f"{row['records_cost_usd']:.9f}",
            f"{row['held_usd']:.9f}",
            ("yes" if row["exact"] else "**no**") + (" (held only)" if "note" in row else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def scaling_lines(scaling: dict[str, Any], meta: dict[str, Any]) -> str:
    """The --workers scaling run, a table of its own."""
    if not scaling:
        return ""
    share = meta["scaling"]["core_share"]
    lines = [
        "",
        f"`--workers N`, each worker confined to {share:g} of a core (bench/cores.py), wrk at "
        f"c={meta['scaling']['concurrency']}, {meta['rounds']} interleaved rounds:",
        "",
        "| store | workers | rps | vs fewest workers | CPU µs/req | books exact? |",
        "|---|---|---|---|---|---|",
    ]
    for store, rows in scaling.items():
        for count, row in rows.items():
            cells = [
                store,
                count,
                f"{row['rps']:.0f}",
                times(row["vs_first"]),
                f"{row['cpu_us_per_req']:.0f}",
                "yes" if row["ledger"]["exact"] else "**no**",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def peer_lines(results: dict[str, Any], meta: dict[str, Any], top: int) -> list[str]:
    """A second table, only when peers ran: each peer over the sidecar, as ratios."""
    rows = {name: entry["vs_sidecar"] for name, entry in results.items() if "vs_sidecar" in entry}
    if not rows:
        return []
    base = next(iter(rows.values()))["sidecar"]
    lines = [
        "",
        "Peers, on the same upstream and machine: "
        + "; ".join(meta.get("peers", {}).values())
        + f". Each over {base} (above 1: the peer does more requests/s, or spends more CPU, "
        "memory or startup time):",
        "",
        f"| peer | rps c=1 | rps c=16 | rps c=64 | CPU µs/req c={top} | RSS idle | startup |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, vs in rows.items():
        cells = [
            name,
            *(times(vs[f"c{c}"]["rps"]) if f"c{c}" in vs else "—" for c in (1, 16, 64)),
            times(vs[f"c{top}"]["cpu_us_per_req"]),
            times(vs["rss_idle"]),
            times(vs["startup"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_readme(table: str) -> None:
    readme = BENCH / "README.md"
    text = readme.read_text() if readme.exists() else ""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    block = f"{start}\n{table}{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text += f"\n## Latest results\n\n{block}\n"
    readme.write_text(text)


def measure_scaling(
    stores: list[str],
    counts: list[int],
    share: float,
    upstream_port: int,
    workdir: Path,
    redis_base: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """`--workers N` on the shared stores, each worker confined to `share` of a core (see
    bench/cores.py): requests/s at c=64 for each N, interleaved rounds, and the books after."""
    try:
        quota = cores.CoreQuota(share)
    except cores.QuotaUnavailable as exc:
        print(f"skipping the --workers scaling run: {exc}", file=sys.stderr)
        return {}
    procs: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {}
    try:
        targets: list[tuple[str, int, Target]] = []
        for store in stores:
            for count in counts:
                name = f"{store}-w{count}"
                redis_url = f"{redis_base}/{len(targets) + 1}"  # a database of its own
                config = sidecar_config(upstream_port, store, workdir, redis_url, name)
                port, admin = free_port(), free_port()
                proc, startup = start_sidecar(
                    config, port, admin, count, workdir / f"sidecar-{name}.log"
                )
                procs.append(proc)
                wait_workers(proc.pid, count)
                for pid in process_tree(proc.pid)[1 if count > 1 else 0 :]:
                    quota.confine(pid)
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                admin_url = f"http://127.0.0.1:{admin}"
                target = Target(
                    name, url, proc.pid, proc, startup, store=store, admin_url=admin_url
                )
                targets.append((store, count, target))
        script = wrk_script(HEADERS, workdir / "scaling.lua")
        for _store, _count, target in targets:
            run_wrk(target, script, 4, 1)
        for round_index in range(args.rounds):
            for _store, _count, target in targets:
                result = run_wrk(target, script, SCALING_CONCURRENCY, args.seconds)
                target.runs.setdefault(SCALING_CONCURRENCY, []).append(result)
                print(f"round {round_index + 1} scaling {target.name:<12} "
                      f"{result['rps']:8.0f} rps  cpu {result['cpu_us_per_req']:.0f} µs  "
                      f"errors {result['errors']:.0f}", flush=True)  # fmt: skip
        for store, count, target in targets:
            runs = target.runs[SCALING_CONCURRENCY]
            out.setdefault(store, {})[str(count)] = {
                "rps": median([run["rps"] for run in runs]),
                "cpu_us_per_req": median([run["cpu_us_per_req"] for run in runs]),
                "errors": median([run["errors"] for run in runs]),
                "ledger": ledger(target),
            }
        for rows in out.values():
            one = rows.get(str(counts[0]))
            for row in rows.values():
                row["vs_first"] = ratio(row["rps"], one["rps"] if one else None)
    finally:
        stop_all(procs)
        quota.close()
    return out


def measure_instructions(
    up_port: int, upstream_url: str, workdir: Path, seconds: float
) -> dict[str, Any]:
    """Instructions per request of the floor and of the memory-store sidecar, under callgrind
    (bench/instructions.py): the machine-independent form of "CPU vs floor"."""
    script = wrk_script(HEADERS, workdir / "instructions.lua")
    floor_port = free_port()
    floor = instructions.count(
        [sys.executable, "-m", "bench.floor", "--port", str(floor_port),
         "--upstream", upstream_url],
        partial(wait_port, floor_port, 180.0),
        f"http://127.0.0.1:{floor_port}/v1/chat/completions",
        script, seconds, workdir, "floor",
    )  # fmt: skip
    print(f"instructions floor            {floor['instructions_per_req']:9.0f} per request "
          f"({floor['requests']:.0f} requests)", flush=True)  # fmt: skip
    config = sidecar_config(up_port, "memory", workdir, "", name="instructions")
    port, admin = free_port(), free_port()
    sidecar = instructions.count(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(config),
         "--port", str(port), "--admin-host", "127.0.0.1", "--admin-port", str(admin)],
        partial(wait_ready, f"http://127.0.0.1:{admin}/readyz", 180.0),
        f"http://127.0.0.1:{port}/v1/chat/completions",
        script, seconds, workdir, "sidecar",
        env={**os.environ, "RINGSIDE_ADMIN_TOKEN": ADMIN_TOKEN},
    )  # fmt: skip
    print(f"instructions sidecar (memory) {sidecar['instructions_per_req']:9.0f} per request "
          f"({sidecar['requests']:.0f} requests)", flush=True)  # fmt: skip
    return {
        "floor": floor,
        "sidecar (memory)": sidecar,
        "ratio": sidecar["instructions_per_req"] / floor["instructions_per_req"],
        "concurrency": instructions.CONCURRENCY,
        "seconds": seconds,
    }


def instruction_lines(counted: dict[str, Any]) -> str:
    if not counted:
        return ""
    floor = counted["floor"]["instructions_per_req"]
    sidecar = counted["sidecar (memory)"]["instructions_per_req"]
    return (
        "\nInstructions per non-stream request (callgrind, user space, wrk at "
        f"c={counted['concurrency']} for {counted['seconds']:g} s; the same for the same code "
        f"on any machine): floor {floor / 1000:.0f}k, sidecar (memory) {sidecar / 1000:.0f}k: "
        f"**{counted['ratio']:.2f}×** the floor.\n"
    )


def wait_workers(pid: int, count: int, timeout: float = 20.0) -> None:
    """With --workers N > 1 the supervisor forks N workers; wait until all N are there."""
    if count == 1:
        return
    deadline = time.monotonic() + timeout
    while len(process_tree(pid)) < count + 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} workers of {pid}")
        time.sleep(0.05)


def start_peer(name: str, upstream_port: int, workdir: Path) -> peers.Peer | None:
    """Install (once) and start a peer; one that cannot be had here is left out, not fatal."""
    model = json.loads(BODY)["model"]
    try:
        return peers.start_peer(name, free_port(), upstream_port, model, KEY, workdir)
    except (peers.PeerError, OSError, subprocess.SubprocessError) as error:
        print(f"peer {name}: left out, {error}", file=sys.stderr, flush=True)
        return None


def peer_names(values: list[str], parser: argparse.ArgumentParser) -> list[str]:
    names = list(dict.fromkeys(n.strip() for v in values for n in v.split(",") if n.strip()))
    for name in names:
        if name not in peers.PEERS:
            parser.error(f"--peer {name}: one of {', '.join(peers.PEERS)}")
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--stores", default="memory,sqlite,redis")
    parser.add_argument("--workers", type=int, default=1, help="sidecar --workers")
    parser.add_argument("--ttfb-samples", type=int, default=200)
    parser.add_argument(
        "--scaling",
        default="1,2",
        help="worker counts for the --workers scaling run on the sqlite and redis stores "
        "('' to skip)",
    )
    parser.add_argument(
        "--core-share",
        type=float,
        default=0.4,
        help="the share of a core each worker of the scaling run is confined to",
    )
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        help="also measure litellm and/or portkey (repeatable or comma-separated)",
    )
    parser.add_argument(
        "--instructions-seconds",
        type=float,
        default=20.0,
        help="length of the callgrind run of the floor and the memory sidecar (0 to skip)",
    )
    parser.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    compile_sources()
    stores = [s for s in args.stores.split(",") if s]
    wanted_peers = peer_names(args.peer, parser)
    described: dict[str, str] = {}
    workdir = Path(tempfile.mkdtemp(prefix="ringside-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    redis_url = redis_base = ""
    scaling: dict[str, Any] = {}
    counted: dict[str, Any] = {}
    try:
        if "redis" in stores:
            if shutil.which("redis-server") is None:
                print("redis-server not found: skipping the redis store", file=sys.stderr)
                stores.remove("redis")
            else:
                redis_port = free_port()
                procs.append(subprocess.Popen(
                    ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                ))  # fmt: skip
                wait_port(redis_port)
                redis_base = f"redis://127.0.0.1:{redis_port}"
                redis_url = f"{redis_base}/0"
        up_port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bench.upstream", "--port", str(up_port)], cwd=BENCH.parent
        ))  # fmt: skip
        wait_port(up_port)
        upstream_url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
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
            port, admin = free_port(), free_port()
            log = workdir / f"sidecar-{store}.log"
            proc, startup = start_sidecar(config, port, admin, args.workers, log)
            procs.append(proc)
            restart_log = workdir / f"sidecar-{store}-restart.log"
            targets.append(
                Target(
                    f"sidecar ({store})",
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    proc.pid,
                    proc,
                    startup,
                    store=store,
                    admin_url=f"http://127.0.0.1:{admin}",
                    restart=partial(
                        start_sidecar, config, free_port(), free_port(), args.workers, restart_log
                    ),
                )
            )
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
        time.sleep(0.5)
        for target in targets:
            if target.pid:
                target.rss_idle = rss_mib(target.pid)

        scripts = {
            target.name: wrk_script(target.headers, workdir / f"post-{index}.lua")
            for index, target in enumerate(targets)
        }
        stream_scripts = {
            target.name: wrk_script(target.headers, workdir / f"stream-{index}.lua", STREAM_BODY)
            for index, target in enumerate(targets)
        }
        for target in targets:  # warm up connection pools and caches
            run_wrk(target, scripts[target.name], 4, 1)
        for round_index in range(args.rounds):
            for c in concurrencies:
                for target in targets:
                    result = run_wrk(target, scripts[target.name], c, args.seconds)
                    target.runs.setdefault(c, []).append(result)
                    print(f"round {round_index + 1} c={c:<3} {target.name:<18} "
                          f"{result['rps']:8.0f} rps  p50 {result['p50_ms']:.3f} ms  "
                          f"p99 {result['p99_ms']:.3f} ms  cpu {result['cpu_us_per_req']:.0f} µs"
                          f"  errors {result['errors']:.0f}", flush=True)  # fmt: skip
            for target in targets:
                result = run_wrk(
                    target, stream_scripts[target.name], STREAM_CONCURRENCY, args.seconds
                )
                target.stream_runs.append(result)
                print(f"round {round_index + 1} stream {target.name:<18} "
                      f"{result['rps']:8.0f} streams/s  p50 {result['p50_ms']:.3f} ms  "
                      f"cpu {result['cpu_us_per_req']:.0f} µs  errors {result['errors']:.0f}",
                      flush=True)  # fmt: skip
            asyncio.run(measure_ttfb(targets, args.ttfb_samples))
        ledgers = {target.name: ledger(target) for target in targets if target.store}
        stop_proxies(targets)
        measure_startups(targets)
        results = summarize(targets, concurrencies)
        for name, books in ledgers.items():
            results[name]["ledger"] = books
        counts = [int(n) for n in args.scaling.split(",") if n]
        shared = [store for store in stores if store != "memory"]
        if counts and shared:
            scaling = measure_scaling(
                shared, counts, args.core_share, up_port, workdir, redis_base, args
            )
        if args.instructions_seconds > 0 and "memory" in stores:
            if instructions.available():
                counted = measure_instructions(
                    up_port, upstream_url, workdir, args.instructions_seconds
                )
            else:
                print("valgrind not found: no instruction counts (apt-get install valgrind)")
    finally:
        stop_all(procs)
        shutil.rmtree(workdir, ignore_errors=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "workers": args.workers,
    }
    if described:
        meta["peers"] = described
    if scaling:
        meta["scaling"] = {"core_share": args.core_share, "concurrency": SCALING_CONCURRENCY}
    out = {"meta": meta, "results": results, "scaling": scaling, "instructions": counted}
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "latest.json").write_text(json.dumps(out, indent=2))
    table = (
        markdown(results, meta, concurrencies)
        + instruction_lines(counted)
        + scaling_lines(scaling, meta)
    )
    print(table)
    if not args.no_readme:
        write_readme(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
