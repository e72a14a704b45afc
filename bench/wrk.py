"""One wrk run against one path: a Lua script per target (the same body, the target's own
headers) and a run's requests/s, p50/p99 latency, errors and CPU µs per request of the proxy's
process tree, with its peak RSS sampled on the side."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

from bench.procfs import cpu_seconds, rss_mib
from bench.targets import Target
from bench.workload import BODY

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
    store_before = cpu_seconds(target.store_pid) if target.store_pid else 0.0
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
    measured = {
        "rps": requests / (result["duration_us"] / 1e6),
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "cpu_us_per_req": cpu * 1e6 / requests,
        "errors": result["errors"] + result["non2xx"],
    }
    if target.store_pid:  # redis-server's own work, beside the sidecar's
        store_cpu = cpu_seconds(target.store_pid) - store_before
        measured["store_cpu_us_per_req"] = store_cpu * 1e6 / requests
    return measured
