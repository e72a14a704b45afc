"""The in-process test layer (issue 18): the api app on aiohttp's test server, and Flows built in
the test, for the pipeline, routing and cascade in detail without a process per test.

The process-level tests (tests/procs.py) stay what users see; these reach inside: the addon chain
a Runtime built, the Flow a hook saw, the attempts a cascade made.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.app import create_apps
from sidecar.appkeys import GatewayState
from sidecar.flow import Flow
from sidecar.ids import new_id
from sidecar.settings import load_settings


def mock_config(content: str) -> dict[str, Any]:
    """A config of one mock provider answering `content`, its model `fc:mock/echo` priced."""
    return {
        "listen": {"api": "127.0.0.1:8787", "admin": "127.0.0.1:8788"},
        "storage": {"backend": "memory"},
        "providers": {"mock": {"kind": "mock", "mock": {"default": {"content": content}}}},
        "models": {"fc:mock/echo": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}},
    }


@asynccontextmanager
async def api_client(
    directory: Path, config: dict[str, Any] | str
) -> AsyncIterator[tuple[TestClient[Any, Any], GatewayState]]:
    """The api app of `config` (a dict, or a YAML text) served in this process, with its
    services started as `ringside serve` starts them; yields a client and the gateway state."""
    path = directory / "ringside.yaml"
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    path.write_text(text)
    state = GatewayState(str(path), load_settings(str(path)))
    api_app, _admin_app = create_apps(state)
    async with TestClient(TestServer(api_app)) as client:
        yield client, state


def make_flow(
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    client_ip: str = "127.0.0.1",
) -> Flow:
    """A Flow as the chat handler makes one, for running hooks or a cascade directly."""
    body = body if body is not None else {}
    return Flow(
        id="req_" + new_id(),
        headers=CIMultiDictProxy(CIMultiDict(headers or {})),
        client_ip=client_ip,
        body=body,
        body_bytes=len(orjson.dumps(body)),
    )
