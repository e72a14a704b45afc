"""A refused or failed request frees its body when it ends (issue 16: a client must not be able to
exhaust the process).

An exception kept on the Flow (or an Attempt, or a cascade's list of failures) with its traceback
closed a reference cycle through the request's frames: every refused 470 KB body waited for a
full garbage collection, and a client sending such bodies grew the sidecar by ~1 MiB a request
(300 refusals: 52 → 391 MiB). Measured here as a user would: the process's RSS.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from tests.conftest import openai_config
from tests.procs import SidecarProcess
from tests.support import post_chat
from tests.test_unread_streams import rss_mib
from tests.upstreams.openai_fake import FakeOpenAI, Reply

BIG = 470_000  # bytes per request, about the soak's hostile schema bodies
ROUNDS = 40  # of each kind below


def test_refused_and_failed_requests_do_not_keep_their_bodies(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    fake_openai.on_model("down-a", Reply(status=500))
    fake_openai.on_model("down-b", Reply(status=503))
    provider = {
        "kind": "openai", "base_url": fake_openai.url, "api_key_env": "TEST_OPENAI_KEY",
        "retries": 0, "circuit": {"failures": 1_000_000},
    }  # fmt: skip
    proc = sidecar_factory(openai_config(fake_openai.url, providers={"openai": provider}))
    filler = "a" * BIG
    kinds = {
        # refused by the JSON parser
        "not JSON": (b"x" * BIG, 400),
        # refused by routing, after the body was parsed
        "unknown ref": (
            json.dumps({"model": "nope/x", "messages": [{"role": "user", "content": filler}]}),
            400,
        ),
        # a cascade whose every candidate fails: the failures are kept to build the answer
        "failed cascade": (
            json.dumps({
                "model": ["fc:openai/down-a", "fc:openai/down-b"],
                "messages": [{"role": "user", "content": filler}],
            }),
            503,
        ),
    }  # fmt: skip
    for body, status in kinds.values():  # warm: buffers and caches every kind needs once
        assert post_chat(proc, body if isinstance(body, bytes) else body.encode()).status == status
    before = rss_mib(proc)

    for _ in range(ROUNDS):
        for name, (body, status) in kinds.items():
            answer = post_chat(proc, body if isinstance(body, bytes) else body.encode())
            assert answer.status == status, (name, answer.body[:200])
            assert answer.json()["error"]["message"]

    grown = rss_mib(proc) - before
    sent = ROUNDS * len(kinds) * BIG / 2**20
    # before the fix: ~1 MiB per request (~120 MiB here); after: a few MiB of allocator noise
    assert grown < 20, f"RSS grew {grown:.1f} MiB over {sent:.0f} MiB of refused bodies"
