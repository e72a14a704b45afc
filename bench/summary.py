"""From the samples to the figures: medians per path, latency added over direct, CPU per
request over the floor's, the Anthropic path over the OpenAI path, and each peer over the
sidecar (the shape of latest.json's results)."""

from __future__ import annotations

import statistics
from typing import Any

from bench.targets import ANTHROPIC_PATH, Target


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
            if all("store_cpu_us_per_req" in run for run in runs):
                entry[f"c{c}"]["store_cpu_us_per_req"] = median(
                    [run["store_cpu_us_per_req"] for run in runs]
                )
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
    add_vs_openai_path(out, concurrencies[-1])
    add_vs_sidecar(out, concurrencies)
    return out


def add_vs_openai_path(out: dict[str, Any], top: int) -> None:
    """The Anthropic path's CPU per request (at the highest concurrency) and per stream over
    the OpenAI path's, both through the memory-store sidecar in the same run."""
    anthropic, openai = out.get(ANTHROPIC_PATH), out.get("sidecar (memory)")
    if anthropic is None or openai is None:
        return
    per_req = ratio(anthropic[f"c{top}"]["cpu_us_per_req"], openai[f"c{top}"]["cpu_us_per_req"])
    vs = {"cpu_us_per_req": per_req}
    if "stream" in anthropic and "stream" in openai:
        vs["cpu_us_per_stream"] = ratio(
            anthropic["stream"]["cpu_us_per_req"], openai["stream"]["cpu_us_per_req"]
        )
    anthropic["vs_openai_path"] = vs


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
