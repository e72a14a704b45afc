"""One JSON line per request on stdout: who, what, which models, how long, what it cost.

Never a prompt, a completion, a key or a token: only ids and numbers.
"""

from __future__ import annotations

import sys
import time
from typing import IO

import orjson

from sidecar.flow import Flow


class AccessLog:
    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self.stream = stream or sys.stdout.buffer

    def done(self, flow: Flow) -> None:
        principal = flow.principal
        error = flow.error
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(flow.started_wall))
            + f".{int(flow.started_wall * 1000) % 1000:03d}Z",
            "request_id": flow.id,
            "key_id": principal.key_id,
            "dev": principal.developer,
            "customer": principal.customer,
            "client_ip": flow.client_ip,
            "path": flow.path,
            "stream": flow.stream,
            "refs_tried": flow.models_tried,
            "ref_used": flow.model_used,
            "status": flow.status,
            "error_code": error.code if error is not None else None,
            "latency_ms": round(flow.seconds * 1000, 3),
            "overhead_ms": round(flow.overhead_seconds * 1000, 3),
            "tokens_in": flow.usage.prompt_tokens,
            "tokens_out": flow.usage.completion_tokens,
            "cost_usd": round(flow.cost_usd, 10),
            "fallback": flow.fallback_triggered,
            "reprompts": flow.reprompts,
        }
        try:
            self.stream.write(orjson.dumps(record) + b"\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stdout must never fail a request
