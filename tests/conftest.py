"""Shared fixtures: fake upstreams on loopback, sidecar processes, a private redis-server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.procs import RedisProcess, SidecarProcess
from tests.upstreams.openai_fake import FakeOpenAI

PROVIDER_KEY = "sk-upstream-provider-secret"


@pytest.fixture(scope="session")
def _openai_server() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    fake.server.start()
    yield fake
    fake.server.stop()


@pytest.fixture
def fake_openai(_openai_server: FakeOpenAI) -> FakeOpenAI:
    """The fake OpenAI upstream, emptied of scripts and recordings for this test."""
    _openai_server.reset()
    return _openai_server


def openai_config(upstream_url: str, **sections: Any) -> dict[str, Any]:
    """A config with one `openai` provider pointed at a fake upstream; sections override."""
    config: dict[str, Any] = {
        "storage": {"backend": "memory"},
        "providers": {
            "openai": {
                "kind": "openai",
                "base_url": upstream_url,
                "api_key_env": "TEST_OPENAI_KEY",
                "timeout": {"connect": 2, "read": 5},
            }
        },
        "models": {
            "fc:openai/gpt-4o-mini": {
                "input_per_mtok": 0.15,
                "output_per_mtok": 0.60,
                "context": 128000,
                "max_output": 16384,
                "caps": ["tools", "json_schema", "vision"],
                "tags": ["small"],
            },
            "fc:openai/gpt-4o": {
                "input_per_mtok": 2.50,
                "output_per_mtok": 10.00,
                "context": 128000,
                "max_output": 16384,
                "caps": ["tools", "json_schema", "vision"],
                "tags": ["large"],
            },
        },
    }
    config.update(sections)
    return config


@pytest.fixture
def sidecar_factory(tmp_path: Any) -> Iterator[Callable[..., SidecarProcess]]:
    """Start sidecars: `sidecar_factory(config_dict, env={...})`; all stopped after the test."""
    started: list[SidecarProcess] = []

    def start(config: dict[str, Any] | str, env: dict[str, str] | None = None) -> SidecarProcess:
        workdir = tmp_path / f"sidecar{len(started)}"
        workdir.mkdir()
        proc = SidecarProcess(
            config, {"TEST_OPENAI_KEY": PROVIDER_KEY, **(env or {})}, str(workdir)
        )
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def sidecar(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> SidecarProcess:
    """A sidecar in open mode in front of the fake OpenAI upstream."""
    return sidecar_factory(openai_config(fake_openai.url))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    if RedisProcess.binary() is None:
        pytest.skip("redis-server not found: apt-get install redis-server (.ci/run does this)")
    server = RedisProcess().start()
    yield server
    server.stop()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Collecting no test is a failure (exit 4), never pytest's quiet exit 5."""
    if not session.items:
        raise pytest.UsageError("no tests were collected: check testpaths and file names")
