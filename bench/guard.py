"""CI's guard on instructions per request (issue 22): `python -m bench.guard` fails when the
memory-store sidecar's production path executes more instructions per request than the committed
baseline (bench/results/instructions_baseline.json) by more than MARGIN; `--update` measures and
rewrites the baseline.

What is counted: the bench's realistic sidecar (bench/workload.py: key auth, a budgeted and
rate-limited customer, metrics, usage records) on the memory store, a non-stream request and a
20-chunk stream, and the floor forwarder beside each; under callgrind
(bench/instructions.py's count_load), over exactly REQUESTS requests at CONCURRENCY
(bench/fixed_load.py, not wrk for a time: no request is cut at either end), after WARM_UP
requests not counted, with SETTLE seconds of quiet around the counted ones.

What is compared: an absolute count moves with the interpreter and the libraries as much as
with our code, and CI installs the libraries' latest releases. So when this run's environment
(ENVIRONMENT: Python's build, the machine, libc, valgrind, the sidecar's installed dependencies)
is the baseline's, each path's own count is compared, against MARGIN; when it is not, each path's
ratio to the floor of the same run, against the wider RATIO_MARGIN (the floor's count moves more
between processes than the sidecar's: it is then counted twice, the lowest kept), and the message
says what differs. A path over its limit is counted once more and fails only when it is over
both times: a regression is there both times, a rare outlier is not.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench import BENCH
from bench.fixed_load import LoadError, send
from bench.instructions import available, count_load, floor_process, sidecar_process
from bench.processes import free_port, start_upstream, stop_all
from bench.workload import ADMIN_TOKEN, BODY, HEADERS, STREAM_BODY, sidecar_config

BASELINE = BENCH / "results" / "instructions_baseline.json"
REQUESTS = 1000  # counted requests per path
WARM_UP = 300  # requests before counting starts
CONCURRENCY = 16
SETTLE = 0.3  # seconds of quiet before and after the counted requests
# Measured on one rev, 4 runs of this command: the sidecar's count moved by 0.23 % between
# processes per request and 0.15 % per stream (over 500 requests instead of 1000: 0.7 %, 12
# runs). A margin of 1.5 % is six times that, and still fails a change of the size of issue 16's
# hostile-input checks (+2.0 %): a deliberate +1.9 % failed it.
MARGIN = 0.015
# The floor's count settles, per process, at one of a few levels (the interpreter's type and
# method caches, not the requests): 571k-581k in the same 4 runs, the ratios to it 1.8 % (per
# request) and 1.3 % (per stream) apart; on a later rev also 606k (and a stream floor of 613k
# against 583k): up to 6 %. So where the floor's count matters it is counted more than once and
# the lowest kept: three times for a baseline, twice for a ratio check; once otherwise (it is
# only shown then). Its higher levels make a ratio lower, never higher than the baseline's.
RATIO_MARGIN = 0.04
FLOOR_RUNS_UPDATE = 3
FLOOR_RUNS_RATIO = 2


@dataclass(frozen=True)
class Guarded:
    """A counted path: the sidecar on `store` (None: the floor), streamed or not; a sidecar path
    names the floor of its kind, for its ratio."""

    name: str
    store: str | None
    stream: bool
    floor: str = ""


FLOOR = Guarded("floor", None, False)
FLOOR_STREAM = Guarded("floor (stream)", None, True)
PATHS = (
    FLOOR,
    Guarded("sidecar (memory)", "memory", False, FLOOR.name),
    FLOOR_STREAM,
    Guarded("sidecar (memory, stream)", "memory", True, FLOOR_STREAM.name),
)


@dataclass(frozen=True)
class Verdict:
    """The comparison's outcome: passed or not, and a line per path naming its figures."""

    passed: bool
    lines: list[str]
    over: list[str]  # the paths over their limit


def compare(
    baseline: dict[str, Any],
    measured: dict[str, Any],
    paths: Iterable[Guarded] = PATHS,
    margin: float = MARGIN,
    ratio_margin: float = RATIO_MARGIN,
) -> Verdict:
    """Each sidecar path of `measured` against `baseline` (both as the baseline file holds them:
    "counts" by path name, "environment"): its count within `margin` of the baseline's when the
    environments are the same, else its ratio to its floor within `ratio_margin`."""
    same = baseline.get("environment") == measured["environment"]
    lines: list[str] = []
    if not same:
        lines.append(
            "this environment is not the baseline's ("
            + "; ".join(
                environment_changes(baseline.get("environment", {}), measured["environment"])
            )
            + "): comparing each path's ratio to the floor of the same run"
        )
    over: list[str] = []
    base_counts, counts = baseline.get("counts", {}), measured["counts"]
    for path in paths:
        if not path.floor:
            continue
        if path.name not in base_counts or (not same and path.floor not in base_counts):
            lines.append(f"{path.name}: no baseline (run `python -m bench.guard --update`)")
            over.append(path.name)
            continue
        count, floor = counts[path.name], counts[path.floor]
        if same:
            figure, base, limit = count, base_counts[path.name], margin
            what = f"{count:,.0f} instructions per request"
            base_what = f"{base:,.0f}"
        else:
            figure, base, limit = (
                count / floor,
                base_counts[path.name] / base_counts[path.floor],
                ratio_margin,
            )
            what = f"{figure:.3f}x the floor ({count:,.0f} vs {floor:,.0f})"
            base_what = f"{base:.3f}x"
        change = figure / base - 1
        line = f"{path.name}: {what}, baseline {base_what} ({change:+.2%}; margin {limit:.1%})"
        if change > limit:
            over.append(path.name)
            line += " REGRESSED"
        elif change < -limit:
            line += " below the baseline: `python -m bench.guard --update` keeps the gain"
        lines.append(line)
    return Verdict(not over, lines, over)


def environment_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What differs between two ENVIRONMENT records, one item each."""
    changes = []
    for key in sorted((set(before) | set(after)) - {"libraries"}):
        if before.get(key) != after.get(key):
            changes.append(f"{key} {before.get(key)!r} -> {after.get(key)!r}")
    old, new = before.get("libraries", {}), after.get("libraries", {})
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            changes.append(f"{name} {old.get(name)} -> {new.get(name)}")
    return changes


def environment() -> dict[str, Any]:
    """What an instruction count depends on besides our code."""
    valgrind = subprocess.run(["valgrind", "--version"], capture_output=True, text=True)
    return {
        "python": sys.version,
        "machine": platform.machine(),
        "libc": " ".join(platform.libc_ver()),
        "valgrind": valgrind.stdout.strip(),
        "libraries": libraries("ringside"),
    }


def libraries(distribution: str) -> dict[str, str]:
    """The installed versions of `distribution`'s requirements, and of theirs (extras left
    out): the code a request runs that is not ours."""
    found: dict[str, str] = {}
    pending = [distribution]
    while pending:
        name = pending.pop()
        for requirement in importlib.metadata.requires(name) or []:
            if "extra ==" in requirement:
                continue
            match = re.match(r"[A-Za-z0-9._-]+", requirement)
            if match is None:
                continue
            needed = match.group(0).lower().replace("_", "-")
            if needed in found:
                continue
            try:
                found[needed] = importlib.metadata.version(needed)
            except importlib.metadata.PackageNotFoundError:
                continue  # a requirement of another platform or Python
            pending.append(needed)
    return dict(sorted(found.items()))


def measure(
    paths: Iterable[Guarded], workdir: Path, requests: int = REQUESTS, floor_runs: int = 1
) -> dict[str, float]:
    """Instructions per request of each path, each counted in a callgrind process of its own; a
    floor `floor_runs` times, keeping the lowest (its count settles per process at one of a few
    levels, see FLOOR_RUNS_UPDATE: the lowest is the floor's own work)."""
    up_port = free_port()
    upstream = start_upstream(up_port)
    upstream_url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
    env = {**os.environ, "RINGSIDE_ADMIN_TOKEN": ADMIN_TOKEN, "PYTHONHASHSEED": "0"}
    counts: dict[str, float] = {}
    try:
        for path in paths:
            for _ in range(floor_runs if path.store is None else 1):
                folder = Path(tempfile.mkdtemp(dir=workdir))  # its config and dumps
                figure = _count(path, up_port, upstream_url, folder, requests, env)
                counts[path.name] = min(counts.get(path.name, figure), figure)
    finally:
        stop_all([upstream])
    return counts


def _count(
    path: Guarded, up_port: int, upstream_url: str, folder: Path, requests: int, env: dict[str, str]
) -> float:
    if path.store is None:
        served = floor_process(upstream_url)
    else:
        served = sidecar_process(sidecar_config(up_port, path.store, folder, "", "guard"))
    load = partial(send, served.url, STREAM_BODY if path.stream else BODY, HEADERS)
    started = time.monotonic()
    counted = count_load(
        served,
        partial(load, WARM_UP, CONCURRENCY),
        partial(load, requests, CONCURRENCY),
        folder,
        "guard",
        env,
        SETTLE,
    )
    figure = counted["instructions_per_req"]
    print(
        f"  {path.name:<26} {figure:>11,.0f} instructions per request"
        f"  ({time.monotonic() - started:.0f} s)",
        flush=True,
    )
    return figure


def git_rev() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=BENCH.parent
    )
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.guard",
        description="Fail when instructions per request regress against the committed baseline.",
    )
    parser.add_argument("--update", action="store_true", help="measure and rewrite the baseline")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--requests", type=int, default=REQUESTS, help="counted per path")
    args = parser.parse_args(argv)
    if not available():
        print("guard: valgrind (callgrind) is not installed: apt-get install valgrind", flush=True)
        return 2
    baseline: dict[str, Any] = {}
    if not args.update:
        try:
            baseline = json.loads(args.baseline.read_text())
        except (OSError, ValueError) as error:
            print(f"guard: no baseline ({error}): `python -m bench.guard --update`", flush=True)
            return 2
    print(
        f"guard: instructions per request under callgrind, {args.requests} requests per path "
        f"at concurrency {CONCURRENCY} after {WARM_UP} not counted",
        flush=True,
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ringside-guard-") as temporary:
        workdir = Path(temporary)
        try:
            here = environment()
            same = baseline.get("environment") == here
            floor_runs = FLOOR_RUNS_UPDATE if args.update else 1 if same else FLOOR_RUNS_RATIO
            measured = {
                "environment": here,
                "counts": measure(PATHS, workdir, args.requests, floor_runs),
            }
            if args.update:
                return _write(args.baseline, measured, args.requests)
            verdict = compare(baseline, measured)
            if not verdict.passed:
                verdict = _again(baseline, measured, verdict, workdir, args.requests, floor_runs)
        except (LoadError, OSError, subprocess.SubprocessError, TimeoutError) as error:
            print(f"guard: could not measure: {error}", flush=True)
            return 2
    for line in verdict.lines:
        print(f"  {line}", flush=True)
    rev = str(baseline.get("rev", "unknown"))[:12]
    if not verdict.passed:
        print(
            f"guard: FAILED: {', '.join(verdict.over)} over the margin against the baseline "
            f"measured on {rev} ({args.baseline}). If the cost is intended, say why in the "
            "commit and run `python -m bench.guard --update`.",
            flush=True,
        )
        return 1
    print(f"guard: passed in {time.monotonic() - started:.0f} s (baseline of {rev})", flush=True)
    return 0


def _again(
    baseline: dict[str, Any],
    measured: dict[str, Any],
    first: Verdict,
    workdir: Path,
    requests: int,
    floor_runs: int,
) -> Verdict:
    """Count the paths over their limit once more (and their floors, when ratios are compared):
    a path fails only when it is over both times."""
    print(f"guard: {', '.join(first.over)} over the limit: counting again", flush=True)
    same = baseline.get("environment") == measured["environment"]
    floors = set() if same else {path.floor for path in PATHS if path.name in first.over}
    again = [path for path in PATHS if path.name in first.over or path.name in floors]
    counts = {**measured["counts"], **measure(again, workdir, requests, floor_runs)}
    second = compare(baseline, {**measured, "counts": counts}, again)
    over = [name for name in first.over if name in second.over]
    lines = [*first.lines, "counted again:", *second.lines]
    return Verdict(not over, lines, over)


def _write(path: Path, measured: dict[str, Any], requests: int) -> int:
    baseline = {
        "what": "instructions per request under callgrind, python -m bench.guard (bench/README.md)",
        "rev": git_rev(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "requests": requests,
        "concurrency": CONCURRENCY,
        "warm_up": WARM_UP,
        "counts": {name: round(value) for name, value in measured["counts"].items()},
        "environment": measured["environment"],
    }
    path.write_text(json.dumps(baseline, indent=2) + "\n")
    print(f"guard: baseline written to {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
