"""CI's instruction guard (bench/guard.py): the verdict from a baseline and a measurement, the
committed baseline's shape, and the fixed-count load it counts under (bench/fixed_load.py).
Nothing here runs callgrind: the counting itself is `python -m bench.guard` in .ci/run."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from bench import guard
from bench.fixed_load import LoadError, send

ENVIRONMENT = {
    "python": "3.11.7 (main) [GCC 12.2.0]",
    "machine": "x86_64",
    "libc": "glibc 2.36",
    "valgrind": "valgrind-3.19.0",
    "libraries": {"aiohttp": "3.10.5", "orjson": "3.10.7"},
}
BASE_COUNTS = {
    "floor": 573_000,
    "sidecar (memory)": 731_000,
    "floor (stream)": 594_000,
    "sidecar (memory, stream)": 1_030_000,
}


def baseline() -> dict[str, Any]:
    return {"rev": "a" * 40, "environment": ENVIRONMENT, "counts": dict(BASE_COUNTS)}


def measured(
    counts: dict[str, float] | None = None, environment: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A measurement: the baseline's counts but `counts`, in `environment` (the baseline's)."""
    return {"environment": environment or ENVIRONMENT, "counts": {**BASE_COUNTS, **(counts or {})}}


def line_of(verdict: guard.Verdict, path: str) -> str:
    return next(line for line in verdict.lines if line.startswith(path + ":"))


def test_the_same_counts_pass() -> None:
    verdict = guard.compare(baseline(), measured())
    assert verdict.passed and verdict.over == []
    assert line_of(verdict, "sidecar (memory)") == (
        "sidecar (memory): 731,000 instructions per request, baseline 731,000 (+0.00%; margin 1.5%)"
    )
    assert not any(line.startswith("floor") for line in verdict.lines)  # floors are not guarded


def test_a_change_within_the_margin_passes() -> None:
    verdict = guard.compare(baseline(), measured({"sidecar (memory)": 731_000 * 1.014}))
    assert verdict.passed
    assert "+1.40%" in line_of(verdict, "sidecar (memory)")
    assert "REGRESSED" not in line_of(verdict, "sidecar (memory)")


def test_a_regression_beyond_the_margin_fails_naming_its_figures() -> None:
    verdict = guard.compare(baseline(), measured({"sidecar (memory, stream)": 1_060_000}))
    assert not verdict.passed
    assert verdict.over == ["sidecar (memory, stream)"]
    assert line_of(verdict, "sidecar (memory, stream)") == (
        "sidecar (memory, stream): 1,060,000 instructions per request, baseline 1,030,000 "
        "(+2.91%; margin 1.5%) REGRESSED"
    )
    assert "REGRESSED" not in line_of(verdict, "sidecar (memory)")


def test_in_the_same_environment_the_floor_does_not_excuse_a_regression() -> None:
    """Same Python and libraries: the sidecar's own count is what is compared, so a floor that
    happened to count high in this run does not hide the sidecar's +2 %."""
    verdict = guard.compare(
        baseline(), measured({"floor": 590_000, "sidecar (memory)": 731_000 * 1.02})
    )
    assert verdict.over == ["sidecar (memory)"]


def test_a_gain_passes_and_says_how_to_keep_it() -> None:
    verdict = guard.compare(baseline(), measured({"sidecar (memory, stream)": 900_000}))
    assert verdict.passed
    line = line_of(verdict, "sidecar (memory, stream)")
    assert "-12.62%" in line and "python -m bench.guard --update" in line


def test_another_environment_compares_ratios_to_the_floor_and_says_what_differs() -> None:
    """A new aiohttp moves every count (here +8 %, the floor's too): not our regression."""
    newer = {**ENVIRONMENT, "libraries": {"aiohttp": "3.11.0", "orjson": "3.10.7"}}
    counts = {name: value * 1.08 for name, value in BASE_COUNTS.items()}
    verdict = guard.compare(baseline(), measured(counts, newer))
    assert verdict.passed
    assert verdict.lines[0] == (
        "this environment is not the baseline's (aiohttp 3.10.5 -> 3.11.0): comparing each "
        "path's ratio to the floor of the same run"
    )
    assert line_of(verdict, "sidecar (memory)") == (
        "sidecar (memory): 1.276x the floor (789,480 vs 618,840), baseline 1.276x "
        "(+0.00%; margin 4.0%)"
    )


def test_another_environment_still_fails_a_ratio_regression() -> None:
    other = {**ENVIRONMENT, "python": "3.11.9 (main) [GCC 12.2.0]"}
    verdict = guard.compare(baseline(), measured({"sidecar (memory)": 731_000 * 1.05}, other))
    assert verdict.over == ["sidecar (memory)"]
    assert (
        "python '3.11.7 (main) [GCC 12.2.0]' -> '3.11.9 (main) [GCC 12.2.0]'" in (verdict.lines[0])
    )
    assert "+5.00%; margin 4.0%) REGRESSED" in line_of(verdict, "sidecar (memory)")


def test_a_path_without_a_baseline_fails() -> None:
    old = baseline()
    del old["counts"]["sidecar (memory, stream)"]
    verdict = guard.compare(old, measured())
    assert verdict.over == ["sidecar (memory, stream)"]
    assert line_of(verdict, "sidecar (memory, stream)") == (
        "sidecar (memory, stream): no baseline (run `python -m bench.guard --update`)"
    )


def test_margins_are_parameters() -> None:
    counts = {"sidecar (memory)": 731_000 * 1.01}
    assert guard.compare(baseline(), measured(counts), margin=0.015).passed
    assert not guard.compare(baseline(), measured(counts), margin=0.005).passed


def test_environment_changes_name_each_difference() -> None:
    after = {**ENVIRONMENT, "machine": "aarch64", "libraries": {"aiohttp": "3.10.5", "yarl": "1.9"}}
    assert guard.environment_changes(ENVIRONMENT, after) == [
        "machine 'x86_64' -> 'aarch64'",
        "orjson 3.10.7 -> None",
        "yarl None -> 1.9",
    ]


def test_libraries_are_the_installed_runtime_requirements() -> None:
    """The sidecar's dependencies and theirs, with their installed versions; not the test
    extra's (a new pytest does not change a request's instructions)."""
    import aiohttp
    import multidict

    found = guard.libraries("ringside")
    assert found["aiohttp"] == aiohttp.__version__
    assert found["multidict"] == multidict.__version__
    assert "yarl" in found  # aiohttp's own requirement
    assert "pytest" not in found and "openai" not in found


def test_the_committed_baseline_covers_every_guarded_path() -> None:
    committed = json.loads(guard.BASELINE.read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", committed["rev"])
    assert set(committed["counts"]) == {path.name for path in guard.PATHS}
    for path in guard.PATHS:
        count = committed["counts"][path.name]
        assert 100_000 < count < 10_000_000, path.name
        if path.floor:
            assert count > committed["counts"][path.floor], path.name
    assert set(committed["environment"]) == {"python", "machine", "libc", "valgrind", "libraries"}
    assert committed["requests"] == guard.REQUESTS
    assert committed["concurrency"] == guard.CONCURRENCY


def test_a_missing_baseline_is_an_error_before_anything_is_measured(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert guard.main(["--baseline", str(tmp_path / "none.json")]) == 2
    out = capsys.readouterr().out
    assert "python -m bench.guard --update" in out or "apt-get install valgrind" in out
    assert "instructions per request under callgrind" not in out


class _Counting(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    posts = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with _Counting.lock:
            _Counting.posts += 1
            refuse = self.path == "/refuse" and _Counting.posts == 7
        body = b'{"error": "no"}' if refuse else b'{"ok": true}'
        self.send_response(500 if refuse else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def counting_server() -> Iterator[str]:
    _Counting.posts = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fixed_load_sends_exactly_the_requests_asked(counting_server: str) -> None:
    assert send(counting_server + "/ok", "{}", {"X-Test": "1"}, 37, 4) == 37
    assert _Counting.posts == 37


def test_fixed_load_refuses_an_answer_other_than_200(counting_server: str) -> None:
    """A path that errors would count fewer instructions and pass: it is an error instead."""
    with pytest.raises(LoadError, match=r"answered 500: b'\{\"error\": \"no\"\}'"):
        send(counting_server + "/refuse", "{}", {}, 20, 2)
