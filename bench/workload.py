"""What the bench sends and the sidecar it sends it to: the request bodies, the client key and
headers, the customer, and the sidecar's config (key auth, a budgeted and rate-limited customer,
metrics, usage records, access log off), the same for every store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

KEY = "rk_bench_secret_key"
BODY = json.dumps(
    {
        "model": "fc:bench/bench-model",
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Say something about foxes in one short sentence."},
        ],
        "max_tokens": 64,
    }
)
ANTHROPIC_MODEL = "fc:bench-anthropic/bench-model"  # the same model on an `anthropic` provider
ANTHROPIC_BODY = json.dumps({**json.loads(BODY), "model": ANTHROPIC_MODEL})


def stream_body(body: str) -> str:
    """`body` asking for a streamed answer."""
    return json.dumps({**json.loads(body), "stream": True})


STREAM_BODY = stream_body(BODY)
CUSTOMER = "acme"
ADMIN_TOKEN = "bench-admin-token"
HEADERS = {"Authorization": f"Bearer {KEY}", "FC-Customer": CUSTOMER}  # the sidecar's, and direct's


def sidecar_config(
    upstream_port: int,
    store: str,
    workdir: Path,
    redis_url: str,
    name: str = "",
    anthropic_port: int | None = None,
) -> Path:
    """The sidecar's config; `name` (default: the store) names its files, so that several
    sidecars on one store kind keep separate books. With `anthropic_port`, the config also
    has an `anthropic` provider on bench/upstream_anthropic.py and ANTHROPIC_MODEL on it, at
    the same prices: a request naming that model takes the Anthropic path."""
    name = name or store
    storage: dict[str, Any] = {"backend": store}
    if store == "sqlite":
        storage["sqlite_path"] = str(workdir / f"{name}.db")
    if store == "redis":
        storage["redis_url"] = redis_url
    config: dict[str, Any] = {
        "storage": storage,
        "providers": {
            "bench": {
                "kind": "openai",
                "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                "timeout": {"connect": 2, "read": 30},
            }
        },
        "models": {
            "fc:bench/bench-model": {
                "input_per_mtok": 0.15,
                "output_per_mtok": 0.60,
                "context": 128000,
                "max_output": 4096,
            }
        },
        "keys": [
            {"id": "bench", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "developer": "b"}
        ],
        "customers": {
            CUSTOMER: {
                "budget": {"usd": 1_000_000, "period": "month"},
                "rate_limit": {"rpm": 100_000_000, "tpm": 2_000_000_000},
            }
        },
        "access_log": {"enabled": False},
    }
    if anthropic_port is not None:
        config["providers"]["bench-anthropic"] = {
            "kind": "anthropic",
            "base_url": f"http://127.0.0.1:{anthropic_port}",
            "timeout": {"connect": 2, "read": 30},
        }
        config["models"][ANTHROPIC_MODEL] = dict(config["models"]["fc:bench/bench-model"])
    path = workdir / f"sidecar-{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
