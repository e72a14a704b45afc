"""Budgets that cannot be overrun (issue 15): the upstream is sent the output cap the hold
covers, an upstream that ignores it is charged in full and counted as overrun, usage an
upstream leaves out is never free, and refs that no response header could carry are refused
before any money moves. Through HTTP, on every store the spend concerns."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.procs import RedisProcess, SidecarProcess, wait_until
from tests.support import metric, metric_samples, post_chat
from tests.test_budget import (
    ADMIN_ENV,
    BODY,
    EVERY_STORE,
    PRICED,
    budget_config,
    nano,
    redis_or_none,  # noqa: F401 (a fixture)
    storage_for,
    unique,
    usage_of,
)
from tests.upstreams.openai_fake import FakeOpenAI, Reply

HELLO_BODY = {"model": PRICED, "messages": [{"role": "user", "content": "hi"}]}
MAX_OUTPUT = 1000  # the catalog's max_output of PRICED (tests/test_budget.py)
RUNAWAY = Reply(content="ok", prompt_tokens=100, completion_tokens=10_000_000)  # ignores caps
RUNAWAY_COST = 100 * 1000 + 10_000_000 * 2000  # nano-USD: $1/M in, $2/M out


def hold_of(body: dict[str, Any], cap: int) -> int:
    """The nano-USD the sidecar holds for `body`: every body byte a prompt token at $1/M, and
    `cap` output tokens at $2/M (post_chat sends json.dumps(body))."""
    return len(json.dumps(body).encode()) * 1000 + cap * 2000


@EVERY_STORE
def test_an_upstream_past_the_cap_is_charged_in_full_counted_as_overrun_and_refused_next(
    backend: str,
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    redis_or_none: RedisProcess | None,  # noqa: F811
    tmp_path: Any,
) -> None:
    fake_openai.on_model("priced", RUNAWAY)
    customer = unique("five")
    storage = storage_for(backend, tmp_path, redis_or_none)
    proc = sidecar_factory(budget_config(fake_openai.url, storage, **{customer: 0.0115}), ADMIN_ENV)

    answer = post_chat(proc, HELLO_BODY, {"FC-Customer": customer})
    refused = post_chat(proc, HELLO_BODY, {"FC-Customer": customer})

    sent = fake_openai.received[0].body
    assert sent["max_completion_tokens"] == MAX_OUTPUT and "max_tokens" not in sent
    assert answer.status == 200
    assert answer.headers["X-Ringside-Cost-USD"] == "20.0001"
    assert refused.status == 402 and refused.error["code"] == "budget_exceeded"
    assert len(fake_openai.received) == 1  # the next reservation saw the real spend
    report = wait_until(lambda: (u := usage_of(proc, customer))["requests"] == 2 and u)
    assert nano(report["spent_usd"]) == RUNAWAY_COST == nano(report["cost_usd"])
    assert report["reserved_usd"] == 0
    overrun = metric(metric_samples(proc), "ringside_budget_overrun_usd_total", customer=customer)
    assert nano(overrun) == RUNAWAY_COST - hold_of(HELLO_BODY, MAX_OUTPUT)
    assert proc.stderr().count("beyond the 1000-token cap it was sent") == 1


def test_the_cap_is_sent_in_the_clients_own_parameter_and_never_raised(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(budget_config(fake_openai.url, {"backend": "memory"}, acme=1.0))
    budgeted = {"FC-Customer": "acme"}

    asks = [
        {**HELLO_BODY, "max_tokens": 60},
        {**HELLO_BODY, "max_tokens": 50_000},
        {**HELLO_BODY, "max_completion_tokens": 50_000},
        {**HELLO_BODY, "max_completion_tokens": 70, "max_tokens": 90_000},
    ]
    for body in asks:
        assert post_chat(proc, body, budgeted).status == 200
    assert post_chat(proc, HELLO_BODY, {"FC-Customer": "unbudgeted"}).status == 200

    sent = [
        {k: r.body[k] for k in ("max_tokens", "max_completion_tokens") if k in r.body}
        for r in fake_openai.received
    ]
    assert sent == [
        {"max_tokens": 60},
        {"max_tokens": MAX_OUTPUT},
        {"max_completion_tokens": MAX_OUTPUT},
        {"max_completion_tokens": 70, "max_tokens": 70},  # the hold covers 70 tokens
        {},  # no budget, no cap: the client's body as it was
    ]


def test_a_budgeted_stream_is_sent_the_cap_and_settles_its_overrun(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    fake_openai.on_model("priced", RUNAWAY)
    proc = sidecar_factory(
        budget_config(fake_openai.url, {"backend": "memory"}, acme=0.0115), ADMIN_ENV
    )
    body = {**HELLO_BODY, "stream": True}

    answer = post_chat(proc, body, {"FC-Customer": "acme"})

    assert answer.status == 200 and answer.body.endswith(b"data: [DONE]\n\n")
    assert fake_openai.received[0].body["max_completion_tokens"] == MAX_OUTPUT
    report = wait_until(lambda: (u := usage_of(proc, "acme"))["requests"] == 1 and u)
    assert nano(report["spent_usd"]) == RUNAWAY_COST
    overrun = metric(metric_samples(proc), "ringside_budget_overrun_usd_total", customer="acme")
    assert nano(overrun) == RUNAWAY_COST - hold_of(body, MAX_OUTPUT)


@pytest.mark.parametrize(
    "usage",
    [None, {"prompt_tokens": -5, "completion_tokens": -1_000_000}, {"prompt_tokens": "many"}],
    ids=["absent", "negative", "not-numbers"],
)
def test_an_answer_without_a_believable_usage_is_charged_an_estimate_not_nothing(
    usage: dict[str, Any] | None,
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    answer_body: dict[str, Any] = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "priced",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 400},
                     "finish_reason": "stop", "logprobs": None}],
    }  # fmt: skip
    if usage is not None:
        answer_body["usage"] = usage
    fake_openai.on_model("priced", Reply(raw_body=json.dumps(answer_body).encode()))
    proc = sidecar_factory(
        budget_config(fake_openai.url, {"backend": "memory"}, acme=1.0), ADMIN_ENV
    )

    answer = post_chat(proc, HELLO_BODY, {"FC-Customer": "acme"})

    assert answer.status == 200
    report = wait_until(lambda: (u := usage_of(proc, "acme"))["requests"] == 1 and u)
    assert report["tokens"]["output"] >= 100  # 400 characters of content: at least 100 tokens
    assert nano(report["spent_usd"]) >= 100 * 2000 > 0
    assert float(answer.headers["X-Ringside-Cost-USD"]) == report["spent_usd"]


HOSTILE_REFS = [
    pytest.param("fc:openai/priced\r\nX-Evil: 1", id="crlf"),
    pytest.param("fc:openai/priced\nX-Evil: 1", id="lf"),
    pytest.param("fc:openai/pri\x00ced", id="nul"),
    pytest.param("fc:openai/pri\x7fced", id="del"),
    pytest.param("fc:openai/prïced", id="non-ascii"),
    pytest.param("fc:openai/" + "p" * 300, id="too-long"),
    pytest.param([PRICED, "fc:openai/x\r\ny"], id="in-an-array"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("model", HOSTILE_REFS)
def test_a_ref_no_header_could_carry_is_refused_before_any_call_or_charge(
    model: object,
    stream: bool,
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    proc = sidecar_factory(
        budget_config(fake_openai.url, {"backend": "memory"}, five=0.0115), ADMIN_ENV
    )

    answer = post_chat(proc, {**BODY, "model": model, "stream": stream}, {"FC-Customer": "five"})

    assert answer.status == 400
    error = answer.error
    assert (error["code"], error["param"]) == ("invalid_model_ref", "model")
    assert "printable ASCII" in error["message"] and "\r" not in error["message"]
    assert "X-Evil" not in answer.headers and "X-Ringside-Model-Used" not in answer.headers
    assert fake_openai.received == []
    assert usage_of(proc, "five")["spent_usd"] == 0
    logged = wait_until(lambda: proc.access_log())
    assert (logged[-1]["status"], logged[-1]["error_code"]) == (400, "invalid_model_ref")
