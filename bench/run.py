"""One command for the whole benchmark: `python -m bench.run` (see bench/README.md).

Starts on loopback a zero-latency upstream, the floor forwarder and the sidecar on a realistic
config (key auth, a budgeted customer with a rate limit, metrics, usage records) for each store,
drives each with wrk at several concurrencies in interleaved rounds, and reports medians:
requests/s, p50/p99 latency, latency added over direct, CPU µs per request of the proxy's
process tree, stream time-to-first-byte, RSS idle and under load, startup time to /readyz.
The memory-store sidecar is measured on two paths: OpenAI's, and Anthropic's (its model on an
`anthropic` provider, against bench/upstream_anthropic.py; --no-anthropic leaves it out).
With --peer, the LiteLLM proxy and/or the Portkey gateway on the same upstream (bench/peers.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import BENCH, instructions, peers
from bench.ledger import ledger
from bench.processes import compile_sources, free_port, start_redis, start_upstream, stop_all
from bench.report import instruction_lines, markdown, scaling_lines, write_readme
from bench.rounds import run_rounds
from bench.scaling import SCALING_CONCURRENCY, measure_scaling
from bench.summary import summarize
from bench.targets import measure_startups, start_targets, stop_proxies


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
    parser.add_argument(
        "--anthropic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the memory sidecar's Anthropic path (an `anthropic` provider, "
        "bench/upstream_anthropic.py), in the rounds and under callgrind",
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
                redis_proc = start_redis(redis_port)
                procs.append(redis_proc)
                redis_base = f"redis://127.0.0.1:{redis_port}"
                redis_url = f"{redis_base}/0"
        up_port = free_port()
        procs.append(start_upstream(up_port))
        upstream_url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        anthropic_port = None
        if args.anthropic and "memory" in stores:
            anthropic_port = free_port()
            procs.append(start_upstream(anthropic_port, "bench.upstream_anthropic"))
        targets, described = start_targets(
            procs, up_port, upstream_url, stores, args.workers, wanted_peers, workdir, redis_url,
            anthropic_port,
        )  # fmt: skip
        for target in targets:
            if target.store == "redis":
                target.store_pid = redis_proc.pid  # redis-server's CPU per request beside it
        run_rounds(targets, concurrencies, args.rounds, args.seconds, args.ttfb_samples, workdir)
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
                counted = instructions.measure_instructions(
                    up_port, upstream_url, workdir, args.instructions_seconds, anthropic_port,
                    tuple(stores), f"{redis_base}/3" if redis_base else "",
                )  # fmt: skip
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
