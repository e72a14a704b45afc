"""Example user addons, loaded by import path from the config's `addons:` list.

    addons:
      - tests.addons_example:Blocklist
      - {path: tests.addons_example:TagMetadata, options: {team: search}}

An addon is a plain class whose methods are hook names (see sidecar/pipeline.py); options from
the config are its constructor's keyword arguments. The sidecar must be able to import it: run
it with the repository root (or wherever the module lives) on PYTHONPATH.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from sidecar.errors import GatewayError
from sidecar.flow import Attempt, Flow


class Lookup:
    """A plain hook with I/O only sometimes: it returns an awaitable then, None otherwise (see
    sidecar/pipeline.py). `X-Lookup: <name>` adds `metadata.lookup`; `X-Lookup: deny` answers
    403 itself after the wait."""

    def request(self, flow: Flow) -> Awaitable[None] | bool | None:
        wanted = flow.headers.get("X-Lookup")
        if wanted is None:
            return None
        if wanted == "cached":
            return True  # not an awaitable: ignored, as a hook's return value always was
        return self._lookup(flow, wanted)

    async def _lookup(self, flow: Flow, wanted: str) -> None:
        await asyncio.sleep(0.01)  # a directory service, say
        if wanted == "deny":
            flow.response = web.json_response(
                {"error": {"message": "denied by the directory", "type": "policy_error",
                           "param": None, "code": "denied"}},
                status=403,
            )  # fmt: skip
            return
        metadata = flow.body.get("metadata")
        flow.body["metadata"] = {**(metadata if isinstance(metadata, dict) else {}),
                                 "lookup": wanted}  # fmt: skip


class TagMetadata:
    """Adds `metadata.team` to every request before it goes upstream (an async hook)."""

    def __init__(self, team: str = "unknown") -> None:
        self.team = team

    async def request(self, flow: Flow) -> None:
        metadata = flow.body.get("metadata")
        flow.body["metadata"] = {**(metadata if isinstance(metadata, dict) else {}),
                                 "team": self.team}  # fmt: skip


class Blocklist:
    """Answers 451 itself, never calling the upstream, when the last message has a blocked word."""

    def __init__(self, words: list[str] | None = None) -> None:
        self.words = tuple(words or ["forbidden"])

    def request(self, flow: Flow) -> None:
        messages: Any = flow.body.get("messages")
        last = messages[-1] if isinstance(messages, list) and messages else {}
        text = str(last.get("content", "")) if isinstance(last, dict) else ""
        if any(word in text for word in self.words):
            flow.response = web.json_response(
                {"error": {"message": "blocked by policy", "type": "policy_error",
                           "param": "messages", "code": "blocked"}},
                status=451,
            )  # fmt: skip


class CustomerRequired:
    """Refuses, with an OpenAI-style error, requests for some refs that name no FC-Customer."""

    def __init__(self, refs: list[str]) -> None:
        self.refs = frozenset(refs)

    def routed(self, flow: Flow) -> None:
        if flow.body.get("model") in self.refs and flow.principal.customer is None:
            raise GatewayError(
                400,
                "customer_required",
                f"{flow.body['model']} needs an FC-Customer header",
                param="FC-Customer",
            )


class Faulty:
    """A buggy addon (SPEC 6.1): raises RuntimeError in each hook that the request's `X-Faulty`
    header names (comma-separated, e.g. `X-Faulty: error,done`); does nothing otherwise."""

    @staticmethod
    def _maybe_fail(flow: Flow, hook: str) -> None:
        wanted = flow.headers.get("X-Faulty")
        if wanted is not None and hook in wanted.split(","):
            raise RuntimeError(f"Faulty.{hook} is broken")

    def headers(self, flow: Flow) -> None:
        self._maybe_fail(flow, "headers")

    def request(self, flow: Flow) -> None:
        self._maybe_fail(flow, "request")

    def routed(self, flow: Flow) -> None:
        self._maybe_fail(flow, "routed")

    def attempt(self, flow: Flow, attempt: Attempt) -> None:
        self._maybe_fail(flow, "attempt")

    def attempt_done(self, flow: Flow, attempt: Attempt) -> None:
        self._maybe_fail(flow, "attempt_done")

    async def response(self, flow: Flow) -> None:  # async: fails when awaited
        self._maybe_fail(flow, "response")

    def error(self, flow: Flow) -> None:
        self._maybe_fail(flow, "error")

    def done(self, flow: Flow) -> None:
        self._maybe_fail(flow, "done")


class Misspelt:
    """`requests` is not a hook (`request` is): refused when the config is loaded."""

    def requests(self, flow: Flow) -> None:
        flow.metadata["seen"] = True
