"""The admin listener: /healthz, /readyz, and /metrics counters after real traffic (SPEC 1, 6)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import openai_config
from tests.procs import SidecarProcess, wait_until
from tests.support import (
    HELLO,
    metric,
    metric_samples,
    module_sidecar,
    post_chat,
    request,
    start_sidecar,
    without_circuit_breakers,
)
from tests.upstreams.openai_fake import FakeOpenAI, Reply

MINI = "fc:openai/gpt-4o-mini"


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    config = openai_config(
        _openai_server.url,
        customers={"cust_known": {}},
        slots={"chat": [MINI, "fc:openai/gpt-4o"]},
    )
    yield from module_sidecar(tmp_path_factory.mktemp("admin"), without_circuit_breakers(config))


def test_healthz_is_ok(gateway: SidecarProcess) -> None:
    answer = request(gateway.admin_url, "GET", "/healthz")
    assert (answer.status, answer.json()) == (200, {"status": "ok"})


def test_readyz_is_ready_once_serving(gateway: SidecarProcess) -> None:
    answer = request(gateway.admin_url, "GET", "/readyz")
    assert (answer.status, answer.json()) == (200, {"status": "ready"})


def test_metrics_is_prometheus_text(gateway: SidecarProcess) -> None:
    answer = request(gateway.admin_url, "GET", "/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert b"# TYPE ringside_requests_total counter" in answer.body


def test_metrics_count_requests_by_status(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    before = metric_samples(gateway)
    post_chat(gateway, {"model": MINI, "messages": HELLO})
    post_chat(gateway, {"model": MINI, "messages": HELLO})
    post_chat(gateway, {"model": "gpt-4o", "messages": HELLO})
    after = metric_samples(gateway)
    assert (
        metric(after, "ringside_requests_total", code="200")
        - metric(before, "ringside_requests_total", code="200")
        == 2
    )
    assert (
        metric(after, "ringside_requests_total", code="400")
        - metric(before, "ringside_requests_total", code="400")
        == 1
    )
    assert (
        metric(after, "ringside_request_duration_seconds_count", stream="false")
        - metric(before, "ringside_request_duration_seconds_count", stream="false")
        == 3
    )


def test_metrics_count_upstream_calls_tokens_and_cost(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    before = metric_samples(gateway)
    fake_openai.script(Reply(prompt_tokens=1000, completion_tokens=500))
    post_chat(gateway, {"model": MINI, "messages": HELLO}, {"FC-Customer": "cust_known"})
    after = metric_samples(gateway)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    labels = {"provider": "openai", "model": MINI}
    assert delta("ringside_upstream_requests_total", **labels, outcome="success") == 1
    assert delta("ringside_tokens_total", **labels, kind="prompt") == 1000
    assert delta("ringside_tokens_total", **labels, kind="completion") == 500
    assert delta("ringside_cost_usd_total", customer="cust_known", model=MINI) == pytest.approx(
        (1000 * 0.15 + 500 * 0.60) / 1e6
    )
    assert delta("ringside_upstream_duration_seconds_count", provider="openai") == 1


def test_metrics_label_customers_outside_the_config_as_other(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    post_chat(gateway, {"model": MINI, "messages": HELLO}, {"FC-Customer": "rando"})
    samples = metric_samples(gateway)
    assert metric(samples, "ringside_cost_usd_total", customer="_other", model=MINI) > 0
    assert not [key for key in samples if ("customer", "rando") in key[1]]


def test_metrics_label_refs_outside_catalog_and_slots_as_provider_other(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    post_chat(gateway, {"model": "fc:openai/some-one-off", "messages": HELLO})
    samples = metric_samples(gateway)
    assert metric(
        samples, "ringside_tokens_total", provider="openai", model="fc:openai/_other",
        kind="prompt",
    ) >= 11  # fmt: skip
    assert not [key for key in samples if ("model", "fc:openai/some-one-off") in key[1]]


def test_metrics_count_fallbacks(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    before = metric_samples(gateway)
    fake_openai.script(Reply(status=503))
    answer = post_chat(gateway, {"model": "slot:chat", "messages": HELLO})
    assert answer.status == 200
    after = metric_samples(gateway)
    labels = {"from_model": MINI, "to_model": "fc:openai/gpt-4o"}
    assert (
        sum(
            value - before.get(key, 0.0)
            for key, value in after.items()
            if key[0] == "ringside_fallbacks_total" and set(labels.items()) <= key[1]
        )
        == 1
    )
    assert metric(after, "ringside_upstream_requests_total", provider="openai", model=MINI,
                  outcome="upstream_unavailable") >= 1  # fmt: skip


def test_metrics_count_streams_and_time_to_first_token(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    before = metric_samples(gateway)
    post_chat(gateway, {"model": MINI, "messages": HELLO, "stream": True})
    after = metric_samples(gateway)
    name = "ringside_time_to_first_token_seconds_count"
    assert metric(after, name, provider="openai") - metric(before, name, provider="openai") == 1
    name = "ringside_request_duration_seconds_count"
    assert metric(after, name, stream="true") - metric(before, name, stream="true") == 1


def test_readyz_fails_while_draining_on_sigterm(
    fake_openai: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    proc = start_sidecar(tmp_path_factory.mktemp("drain"), openai_config(fake_openai.url)).start()
    answers = []
    try:
        fake_openai.script(Reply(delay=1.5))
        slow = threading.Thread(
            target=lambda: answers.append(post_chat(proc, {"model": MINI, "messages": HELLO}))
        )
        slow.start()
        wait_until(lambda: fake_openai.received)
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: request(proc.admin_url, "GET", "/readyz").status == 503, timeout=1)
        slow.join(5)
        assert proc.proc.wait(10) == 0
    finally:
        proc.stop()
    assert [answer.status for answer in answers] == [200]  # the in-flight request finished


def test_metrics_can_be_turned_off(
    fake_openai: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = openai_config(fake_openai.url, metrics={"enabled": False})
    proc = start_sidecar(tmp_path_factory.mktemp("nometrics"), config).start()
    try:
        assert request(proc.admin_url, "GET", "/metrics").status == 404
        assert request(proc.admin_url, "GET", "/healthz").status == 200
    finally:
        proc.stop()
