"""A cascade under a budget (SPEC 2.2): a candidate whose worst case the remaining budget cannot
cover is skipped, not the end of the request; 402 only when no candidate fits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.procs import RedisProcess, SidecarProcess, wait_until
from tests.support import metric, metric_samples, post_chat
from tests.test_budget import (
    ADMIN_ENV,
    ANSWER,
    COST,
    EVERY_STORE,
    PRICED,
    budget_config,
    nano,
    redis_or_none,  # noqa: F401 (a fixture)
    storage_for,
    unique,
    usage_of,
)
from tests.upstreams.openai_fake import FakeOpenAI

PRICEY = "fc:openai/pricey"  # $100 per million output tokens: 1000 of them cost $0.1
TINY = "fc:openai/tiny"  # a 10-token window
BODY = {"messages": [{"role": "user", "content": "hi"}]}  # no max_tokens: each model's max_output


def cascade_budget_config(upstream: str, storage: dict[str, Any], **customers: float) -> Any:
    config = budget_config(upstream, storage, **customers)
    config["models"][PRICEY] = {
        "input_per_mtok": 1.0, "output_per_mtok": 100.0, "context": 128000, "max_output": 1000,
    }  # fmt: skip
    config["models"][TINY] = {
        "input_per_mtok": 0.1, "output_per_mtok": 0.1, "context": 10, "max_output": 1000,
    }  # fmt: skip
    return config


@EVERY_STORE
def test_a_candidate_the_budget_cannot_cover_is_skipped_for_the_next(
    backend: str,
    fake_openai: FakeOpenAI,
    sidecar_factory: Callable[..., SidecarProcess],
    redis_or_none: RedisProcess | None,  # noqa: F811
    tmp_path: Any,
) -> None:
    fake_openai.on_model("priced", ANSWER)
    customer = unique("thrifty")
    storage = storage_for(backend, tmp_path, redis_or_none)
    proc = sidecar_factory(
        cascade_budget_config(fake_openai.url, storage, **{customer: 0.01}), ADMIN_ENV
    )

    answer = post_chat(proc, {**BODY, "model": [PRICEY, PRICED]}, {"FC-Customer": customer})

    assert answer.status == 200, answer.body
    assert answer.json()["object"] == "chat.completion"
    assert answer.headers["X-Ringside-Models-Tried"] == f"{PRICEY},{PRICED}"
    assert answer.headers["X-Ringside-Model-Used"] == PRICED
    assert answer.headers["X-Ringside-Fallback-Triggered"] == "true"
    assert fake_openai.models_called() == ["priced"]  # the unaffordable one was never called
    samples = metric_samples(proc)
    reason = {"from_model": PRICEY, "to_model": PRICED, "reason": "budget"}
    assert metric(samples, "ringside_fallbacks_total", **reason) == 1
    assert metric(samples, "ringside_budget_exceeded_total", customer=customer) == 0
    logged = wait_until(lambda: proc.access_log())[-1]
    assert logged["refs_tried"] == [PRICEY, PRICED] and logged["ref_used"] == PRICED
    report = wait_until(lambda: (u := usage_of(proc, customer))["requests"] == 1 and u)
    assert nano(report["spent_usd"]) == COST and report["reserved_usd"] == 0


def test_402_only_when_no_candidate_fits_naming_each_and_counted_once(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(
        cascade_budget_config(fake_openai.url, {"backend": "memory"}, poor=0.0005), ADMIN_ENV
    )

    refused = post_chat(proc, {**BODY, "model": [PRICEY, PRICED]}, {"FC-Customer": "poor"})

    assert refused.status == 402
    error = refused.error
    assert (error["code"], error["type"]) == ("budget_exceeded", "insufficient_quota")
    assert error["message"].startswith("no candidate model fits the budget: ")
    assert f"{PRICEY}: the budget of customer 'poor'" in error["message"]
    assert f"{PRICED}: the budget of customer 'poor'" in error["message"]
    assert refused.headers["X-Ringside-Models-Tried"] == f"{PRICEY},{PRICED}"
    assert "X-Ringside-Model-Used" not in refused.headers
    assert fake_openai.received == []
    samples = metric_samples(proc)
    assert metric(samples, "ringside_budget_exceeded_total", customer="poor") == 1


def test_too_small_or_unaffordable_everywhere_is_402_and_a_lone_stream_is_refused_as_json(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(
        cascade_budget_config(fake_openai.url, {"backend": "memory"}, poor=0.0005), ADMIN_ENV
    )
    long_body = {**BODY, "messages": [{"role": "user", "content": "word " * 50}]}

    mixed = post_chat(proc, {**long_body, "model": [TINY, PRICEY]}, {"FC-Customer": "poor"})
    stream = post_chat(proc, {**BODY, "model": PRICEY, "stream": True}, {"FC-Customer": "poor"})

    assert mixed.status == 402 and mixed.error["code"] == "budget_exceeded"
    assert f"{TINY}: skipped" in mixed.error["message"]
    assert stream.status == 402 and stream.headers["Content-Type"].startswith("application/json")
    assert stream.error["message"].startswith("the budget of customer 'poor' cannot cover")
    assert fake_openai.received == []
