"""The markdown tables of a run (all paths, streams, the Anthropic path, the books, peers,
instructions, the --workers scaling run) and their place in bench/README.md."""

from __future__ import annotations

from typing import Any

from bench import BENCH
from bench.instructions import REDIS_PATH, SQLITE_PATH
from bench.rounds import STREAM_CONCURRENCY
from bench.targets import ANTHROPIC_PATH


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
    lines += store_cpu_lines(results, top)
    tables = (
        stream_lines(results)
        + anthropic_lines(results, top)
        + ledger_lines(results)
        + peer_lines(results, meta, top)
    )
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


def anthropic_lines(results: dict[str, Any], top: int) -> list[str]:
    """What the Anthropic path's row is, and its CPU beside the OpenAI path's."""
    entry = results.get(ANTHROPIC_PATH)
    if entry is None or "vs_openai_path" not in entry:
        return []
    vs = entry["vs_openai_path"]
    openai = results["sidecar (memory)"]
    per_stream = ""
    if "cpu_us_per_stream" in vs:
        per_stream = (
            f"; per stream {entry['stream']['cpu_us_per_req']:.0f} µs vs "
            f"{openai['stream']['cpu_us_per_req']:.0f} µs: **{times(vs['cpu_us_per_stream'])}**"
        )
    return [
        "",
        f"{ANTHROPIC_PATH}: the memory sidecar with its model on an `anthropic` provider "
        "(requests translated to the Messages API of `bench/upstream_anthropic.py`, which "
        "gives the same answer, and its answers translated back); its added latency, TTFB and "
        "CPU vs floor are over the OpenAI upstream's direct and floor. Beside the OpenAI path "
        f"(sidecar (memory)), CPU per request at c={top} "
        f"{entry[f'c{top}']['cpu_us_per_req']:.0f} µs vs "
        f"{openai[f'c{top}']['cpu_us_per_req']:.0f} µs: **{times(vs['cpu_us_per_req'])}**"
        f"{per_stream}.",
    ]


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


def store_cpu_lines(results: dict[str, Any], top: int) -> list[str]:
    """redis-server's CPU per request under a redis sidecar's load, beside the sidecar's own
    (the table's CPU is the sidecar's process tree alone)."""
    lines = []
    for name, entry in results.items():
        at_top = entry.get(f"c{top}", {})
        if "store_cpu_us_per_req" in at_top:
            lines.append(
                f"\n{name}: redis-server's own CPU per request at c={top} is "
                f"{at_top['store_cpu_us_per_req']:.0f} µs, beside the sidecar's "
                f"{at_top['cpu_us_per_req']:.0f} µs in the table."
            )
    return lines


def instruction_lines(counted: dict[str, Any]) -> str:
    if not counted:
        return ""
    floor = counted["floor"]["instructions_per_req"]
    sidecar = counted["sidecar (memory)"]["instructions_per_req"]
    anthropic = ""
    if ANTHROPIC_PATH in counted:
        anthropic = (
            f"; {ANTHROPIC_PATH} "
            f"{counted[ANTHROPIC_PATH]['instructions_per_req'] / 1000:.0f}k: "
            f"**{counted['anthropic_ratio']:.2f}×** the floor, "
            f"{counted['anthropic_vs_openai_path']:.2f}× the OpenAI path"
        )
    on_sqlite = ""
    if SQLITE_PATH in counted:
        on_sqlite = (
            f"; {SQLITE_PATH} {counted[SQLITE_PATH]['instructions_per_req'] / 1000:.0f}k: "
            f"**{counted['sqlite_ratio']:.2f}×** the floor"
        )
    if REDIS_PATH in counted:
        on_sqlite += (
            f"; {REDIS_PATH} {counted[REDIS_PATH]['instructions_per_req'] / 1000:.0f}k: "
            f"**{counted['redis_ratio']:.2f}×** the floor (the sidecar's process alone)"
        )
    return (
        "\nInstructions per non-stream request (callgrind, user space, wrk at "
        f"c={counted['concurrency']} for {counted['seconds']:g} s; the same for the same code "
        f"on any machine): floor {floor / 1000:.0f}k, sidecar (memory) {sidecar / 1000:.0f}k: "
        f"**{counted['ratio']:.2f}×** the floor{anthropic}{on_sqlite}.\n"
    )
