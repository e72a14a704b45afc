"""Helpers the foundation's test modules share: module-scoped sidecars, raw HTTP, metrics.

Raw HTTP goes through `http.client` so that a test can send what no SDK would (bodies that are
not JSON, oversized bodies, odd headers) and read exactly what came back.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PROVIDER_KEY
from tests.procs import SidecarProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]


def without_circuit_breakers(config: dict[str, Any]) -> dict[str, Any]:
    """The config with breakers that never open: for modules that script many upstream failures
    in a row and want each test to reach the upstream."""
    for provider in config.get("providers", {}).values():
        provider["circuit"] = {"failures": 1_000_000, "cooldown": 0.001}
    return config


def start_sidecar(
    workdir: Path, config: dict[str, Any] | str, env: dict[str, str] | None = None
) -> SidecarProcess:
    """A sidecar with the provider key in its environment, as the `sidecar_factory` starts it."""
    return SidecarProcess(config, {"TEST_OPENAI_KEY": PROVIDER_KEY, **(env or {})}, str(workdir))


def module_sidecar(
    workdir: Path, config: dict[str, Any] | str, env: dict[str, str] | None = None
) -> Iterator[SidecarProcess]:
    """Body of a module-scoped fixture: one sidecar for every test of a module."""
    proc = start_sidecar(workdir, config, env).start()
    yield proc
    proc.stop()


def sdk(proc: SidecarProcess, api_key: str = "unused-in-open-mode") -> openai.OpenAI:
    return openai.OpenAI(base_url=proc.base_url, api_key=api_key, max_retries=0, timeout=15)


def async_sdk(proc: SidecarProcess, api_key: str = "unused-in-open-mode") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proc.base_url, api_key=api_key, max_retries=0, timeout=15)


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        """The OpenAI error object, after checking the envelope has exactly its four fields."""
        data = self.json()
        assert set(data) == {"error"}, data
        error = data["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"], error
        assert isinstance(error["type"], str) and error["type"], error
        return dict(error)


def request(
    base: str,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | list[Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 15,
) -> Answer:
    """One raw HTTP request to `base` (`http://127.0.0.1:PORT`)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=payload, headers=all_headers)
        response = conn.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        conn.close()


def post_chat(
    proc: SidecarProcess,
    body: bytes | dict[str, Any] | list[Any],
    headers: dict[str, str] | None = None,
) -> Answer:
    return request(proc.url, "POST", CHAT, body, headers)


def sse_events(body: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    events = []
    for block in body.decode().split("\n\n"):
        lines = [line[5:].strip() for line in block.splitlines() if line.startswith("data:")]
        if lines:
            events.append("\n".join(lines))
    return events


def metric_samples(proc: SidecarProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the admin /metrics page: (name, labels) → value."""
    samples = {}
    for family in text_string_to_metric_families(proc.metrics_text()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def ringside(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m sidecar ARGS` (the `ringside` command) with only the given environment."""
    base_env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        env={**base_env, **(env or {})},
        timeout=30,
        check=False,
    )
