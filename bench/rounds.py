"""The main measurement: every path under wrk at each concurrency, then streamed, then the
paired TTFB samples, in interleaved rounds (one machine state per round for all paths)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bench.procfs import rss_mib
from bench.targets import Target
from bench.ttfb import measure_ttfb
from bench.workload import stream_body
from bench.wrk import run_wrk, wrk_script

STREAM_CONCURRENCY = 16  # streamed wrk runs: 20-chunk SSE answers, at one concurrency


def run_rounds(
    targets: list[Target],
    concurrencies: list[int],
    rounds: int,
    seconds: float,
    ttfb_samples: int,
    workdir: Path,
) -> None:
    """Idle RSS, a warm-up, then `rounds` rounds; each target keeps its own samples."""
    time.sleep(0.5)
    for target in targets:
        if target.pid:
            target.rss_idle = rss_mib(target.pid)

    scripts = {
        target.name: wrk_script(target.headers, workdir / f"post-{index}.lua", target.body)
        for index, target in enumerate(targets)
    }
    stream_scripts = {
        target.name: wrk_script(
            target.headers, workdir / f"stream-{index}.lua", stream_body(target.body)
        )
        for index, target in enumerate(targets)
    }
    for target in targets:  # warm up connection pools and caches
        run_wrk(target, scripts[target.name], 4, 1)
    for round_index in range(rounds):
        for c in concurrencies:
            for target in targets:
                result = run_wrk(target, scripts[target.name], c, seconds)
                target.runs.setdefault(c, []).append(result)
                print(f"round {round_index + 1} c={c:<3} {target.name:<27} "
                      f"{result['rps']:8.0f} rps  p50 {result['p50_ms']:.3f} ms  "
                      f"p99 {result['p99_ms']:.3f} ms  cpu {result['cpu_us_per_req']:.0f} µs"
                      f"  errors {result['errors']:.0f}", flush=True)  # fmt: skip
        for target in targets:
            result = run_wrk(target, stream_scripts[target.name], STREAM_CONCURRENCY, seconds)
            target.stream_runs.append(result)
            print(f"round {round_index + 1} stream {target.name:<27} "
                  f"{result['rps']:8.0f} streams/s  p50 {result['p50_ms']:.3f} ms  "
                  f"cpu {result['cpu_us_per_req']:.0f} µs  errors {result['errors']:.0f}",
                  flush=True)  # fmt: skip
        asyncio.run(measure_ttfb(targets, ttfb_samples))
