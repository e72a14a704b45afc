"""The --workers scaling run: the sidecar on the shared stores with N workers, each worker
confined to a share of a core (bench/cores.py), requests/s at one concurrency, and the books."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import cores
from bench.ledger import ledger
from bench.processes import free_port, start_sidecar, stop_all, wait_workers
from bench.procfs import process_tree
from bench.summary import median, ratio
from bench.targets import Target
from bench.workload import HEADERS, sidecar_config
from bench.wrk import run_wrk, wrk_script

SCALING_CONCURRENCY = 64  # the --workers scaling run


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
