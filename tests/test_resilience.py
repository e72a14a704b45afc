"""Retries of the same candidate and per-provider circuit breakers (cascade issue)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import SidecarProcess
from tests.upstreams.openai_fake import FakeOpenAI, Reply

MESSAGES = [{"role": "user", "content": "hello"}]
PRICE = {"input_per_mtok": 0.1, "output_per_mtok": 0.4, "context": 128000, "max_output": 4096}


def provider(upstream: str, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "openai",
        "base_url": upstream,
        "api_key_env": "TEST_OPENAI_KEY",
        "timeout": {"connect": 1, "read": 3},
        **extra,
    }


def config(upstream: str, **providers: dict[str, Any]) -> dict[str, Any]:
    return {
        "storage": {"backend": "memory"},
        "providers": providers,
        "models": {f"fc:{name}/m-{name}": PRICE for name in providers},
    }


def gauge(proc: SidecarProcess, name: str, labels: dict[str, str]) -> float | None:
    for family in text_string_to_metric_families(proc.metrics_text()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def client_for(proc: SidecarProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=proc.base_url, api_key="open-mode", max_retries=0)


def test_retries_the_same_candidate_until_it_answers(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(
        config(fake_openai.url, a=provider(fake_openai.url, retries=2, retry_backoff=0.01))
    )
    fake_openai.script(Reply(status=503), Reply(status=502), Reply(content="third time"))
    raw = client_for(proc).chat.completions.with_raw_response.create(
        model="fc:a/m-a", messages=MESSAGES
    )
    assert raw.parse().choices[0].message.content == "third time"
    assert fake_openai.models_called() == ["m-a", "m-a", "m-a"]
    assert raw.headers["X-Ringside-Models-Tried"] == "fc:a/m-a"
    assert raw.headers["X-Ringside-Fallback-Triggered"] == "false"


def test_retries_are_bounded_then_the_cascade_moves_on(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(
        config(
            fake_openai.url,
            a=provider(fake_openai.url, retries=1, retry_backoff=0.01),
            b=provider(fake_openai.url),
        )
    )
    fake_openai.on_model("m-a", Reply(status=500))
    raw = client_for(proc).chat.completions.with_raw_response.create(
        model=["fc:a/m-a", "fc:b/m-b"], messages=MESSAGES
    )
    assert fake_openai.models_called() == ["m-a", "m-a", "m-b"]
    assert raw.headers["X-Ringside-Model-Used"] == "fc:b/m-b"


def test_client_faults_are_not_retried(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(
        config(fake_openai.url, a=provider(fake_openai.url, retries=3, retry_backoff=0.01))
    )
    fake_openai.on_model("m-a", Reply(status=400, error_message="bad temperature"))
    with pytest.raises(openai.BadRequestError):
        client_for(proc).chat.completions.create(model="fc:a/m-a", messages=MESSAGES)
    assert fake_openai.models_called() == ["m-a"]


def test_retry_after_is_honoured(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(
        config(fake_openai.url, a=provider(fake_openai.url, retries=1, retry_backoff=0.01))
    )
    fake_openai.script(Reply(status=429, headers={"Retry-After": "0.6"}), Reply())
    client_for(proc).chat.completions.create(model="fc:a/m-a", messages=MESSAGES)
    first, second = fake_openai.received
    assert second.at - first.at >= 0.55


def test_retry_after_over_the_cap_escalates_instead_of_waiting(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(
        config(
            fake_openai.url,
            a=provider(fake_openai.url, retries=2, retry_after_cap=1),
            b=provider(fake_openai.url),
        )
    )
    fake_openai.on_model("m-a", Reply(status=429, headers={"Retry-After": "30"}))
    started = time.monotonic()
    raw = client_for(proc).chat.completions.with_raw_response.create(
        model=["fc:a/m-a", "fc:b/m-b"], messages=MESSAGES
    )
    assert time.monotonic() - started < 5
    assert fake_openai.models_called() == ["m-a", "m-b"]
    assert raw.headers["X-Ringside-Model-Used"] == "fc:b/m-b"


def test_open_circuit_skips_the_provider_then_probes_after_cooldown(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(
        config(
            fake_openai.url,
            a=provider(fake_openai.url, circuit={"failures": 2, "cooldown": 1.0}),
            b=provider(fake_openai.url),
        )
    )
    client = client_for(proc)
    cascade = ["fc:a/m-a", "fc:b/m-b"]
    fake_openai.on_model("m-a", Reply(status=503))
    for _ in range(2):
        client.chat.completions.create(model=cascade, messages=MESSAGES)
    assert gauge(proc, "ringside_provider_circuit_open", {"provider": "a"}) == 1.0

    fake_openai.reset()
    raw = client.chat.completions.with_raw_response.create(model=cascade, messages=MESSAGES)
    assert fake_openai.models_called() == ["m-b"]  # a was not called at all
    assert raw.headers["X-Ringside-Models-Tried"] == "fc:b/m-b"

    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="fc:a/m-a", messages=MESSAGES)
    assert caught.value.status_code == 503
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "upstream_unavailable"
    assert "circuit" in caught.value.body["message"]

    time.sleep(1.1)  # cooldown over: one probe goes through, succeeds, the circuit closes
    fake_openai.reset()
    raw = client.chat.completions.with_raw_response.create(model=cascade, messages=MESSAGES)
    assert raw.headers["X-Ringside-Model-Used"] == "fc:a/m-a"
    assert gauge(proc, "ringside_provider_circuit_open", {"provider": "a"}) == 0.0


def test_failed_probe_opens_the_circuit_again(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(
        config(
            fake_openai.url,
            a=provider(fake_openai.url, circuit={"failures": 1, "cooldown": 0.5}),
            b=provider(fake_openai.url),
        )
    )
    client = client_for(proc)
    cascade = ["fc:a/m-a", "fc:b/m-b"]
    fake_openai.on_model("m-a", Reply(status=500))
    client.chat.completions.create(model=cascade, messages=MESSAGES)
    time.sleep(0.6)
    client.chat.completions.create(model=cascade, messages=MESSAGES)  # the probe fails
    assert fake_openai.models_called() == ["m-a", "m-b", "m-a", "m-b"]
    fake_openai.reset()
    client.chat.completions.create(model=cascade, messages=MESSAGES)
    assert fake_openai.models_called() == ["m-b"]


def test_client_faults_do_not_open_the_circuit(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(
        config(
            fake_openai.url, a=provider(fake_openai.url, circuit={"failures": 1, "cooldown": 30})
        )
    )
    client = client_for(proc)
    fake_openai.on_model("m-a", Reply(status=400, error_message="bad request"))
    for _ in range(3):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="fc:a/m-a", messages=MESSAGES)
    assert fake_openai.models_called() == ["m-a", "m-a", "m-a"]
