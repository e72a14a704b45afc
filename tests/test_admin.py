"""The admin listener: /healthz, /readyz, /metrics counters after real traffic (SPEC 1, 6), and
who may read it: admin.metrics_token for /metrics, admin.token for the usage endpoint (SPEC 5)."""

from __future__ import annotations

import http.client
import signal
import threading
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import openai_config
from tests.procs import SidecarProcess, wait_until
from tests.support import (
    HELLO,
    Answer,
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


# -- who can read the admin listener: admin.metrics_token and admin.token (SPEC 1, 5) ---------

METRICS_TOKEN = "metrics-token-for-tests-0123456789"
USAGE_TOKEN = "usage-token-for-tests-0123456789"
ENV_TOKEN = "env-admin-token-for-tests-0123456789"
SECRET_CUSTOMER = "cust_secret_spender"
USAGE = f"/v1/customers/{SECRET_CUSTOMER}/usage"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def with_authorization(base: str, path: str, value: bytes) -> Answer:
    """GET `path` with an Authorization header of raw bytes (what no client library sends)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=15)
    try:
        conn.putrequest("GET", path)
        conn.putheader("Authorization", value)
        conn.endheaders()
        response = conn.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def guarded(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    """A sidecar whose admin section sets both tokens, the usage one through `${ENV}`; the
    environment also holds RINGSIDE_ADMIN_TOKEN, which the config's admin.token overrides."""
    config = openai_config(
        _openai_server.url,
        customers={SECRET_CUSTOMER: {"budget": {"usd": 5.0}}},
        admin={"token": "${USAGE_TOKEN_FOR_TESTS}", "metrics_token": METRICS_TOKEN},
    )
    env = {"USAGE_TOKEN_FOR_TESTS": USAGE_TOKEN, "RINGSIDE_ADMIN_TOKEN": ENV_TOKEN}
    yield from module_sidecar(tmp_path_factory.mktemp("guarded"), config, env)


def assert_refused_scrape(answer: Answer, *secrets: str) -> None:
    """401 with the bearer challenge, a body that says what to send, and nothing it guards."""
    assert answer.status == 401, answer.body
    assert answer.headers["WWW-Authenticate"] == 'Bearer realm="ringside-metrics"'
    text = answer.body.decode()
    assert "admin.metrics_token" in text and "Authorization: Bearer <token>" in text
    for hidden in (METRICS_TOKEN, SECRET_CUSTOMER, "ringside_", *secrets):
        assert hidden not in text


def test_metrics_token_refuses_a_scrape_without_a_token(guarded: SidecarProcess) -> None:
    assert_refused_scrape(request(guarded.admin_url, "GET", "/metrics"))


def test_metrics_token_refuses_a_wrong_token_without_echoing_it(guarded: SidecarProcess) -> None:
    wrong = "not-the-metrics-token-but-close"
    answer = request(guarded.admin_url, "GET", "/metrics", headers=bearer(wrong))
    assert_refused_scrape(answer, wrong)


def test_metrics_token_refuses_the_token_under_another_scheme(guarded: SidecarProcess) -> None:
    answer = request(guarded.admin_url, "GET", "/metrics", headers={"Authorization": METRICS_TOKEN})
    assert_refused_scrape(answer)


def test_metrics_token_serves_prometheus_text_to_its_bearer(guarded: SidecarProcess) -> None:
    answer = request(guarded.admin_url, "GET", "/metrics", headers=bearer(METRICS_TOKEN))
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(answer.body.decode())}
    assert "ringside_requests" in families  # the parser names a counter without _total
    limits = families["ringside_budget_limit_usd"].samples
    assert [(s.labels, s.value) for s in limits] == [({"customer": SECRET_CUSTOMER}, 5.0)]


def test_metrics_token_is_not_the_admin_token(guarded: SidecarProcess) -> None:
    answer = request(guarded.admin_url, "GET", "/metrics", headers=bearer(USAGE_TOKEN))
    assert_refused_scrape(answer, USAGE_TOKEN)
    assert request(guarded.admin_url, "GET", USAGE, headers=bearer(METRICS_TOKEN)).status == 401


@pytest.mark.parametrize(
    "value",
    [
        b"Bearer " + b"A" * 8000,  # just under the HTTP parser's 8190-byte limit on a header
        "Bearer ünïcödé-".encode() + METRICS_TOKEN.encode(),
        b"Bearer \xff\xfe\x80" + METRICS_TOKEN.encode(),  # not UTF-8 at all
        b"Bearer " + METRICS_TOKEN.encode() + b"-and-more",
        b"Bearer",
        b"Basic dXNlcjpwYXNzd29yZA==",
    ],
    ids=["huge", "non-ascii", "not-utf8", "token-prefix", "scheme-only", "basic"],
)
def test_a_hostile_authorization_header_is_401_never_500(
    guarded: SidecarProcess, value: bytes
) -> None:
    assert_refused_scrape(with_authorization(guarded.admin_url, "/metrics", value))
    usage = with_authorization(guarded.admin_url, USAGE, value)
    assert usage.status == 401 and usage.error["code"] == "invalid_api_key"


def test_a_header_over_the_parser_limit_is_a_400_and_the_sidecar_goes_on(
    guarded: SidecarProcess,
) -> None:
    answer = with_authorization(guarded.admin_url, "/metrics", b"Bearer " + b"A" * 100_000)
    assert answer.status == 400  # refused by aiohttp's HTTP parser, before any handler
    assert (
        request(guarded.admin_url, "GET", "/metrics", headers=bearer(METRICS_TOKEN)).status == 200
    )


def test_probes_stay_open_with_a_metrics_token(guarded: SidecarProcess) -> None:
    assert request(guarded.admin_url, "GET", "/healthz").status == 200
    assert request(guarded.admin_url, "GET", "/readyz").status == 200


def test_probes_stay_open_without_a_metrics_token(gateway: SidecarProcess) -> None:
    assert request(gateway.admin_url, "GET", "/healthz").status == 200
    assert request(gateway.admin_url, "GET", "/readyz").status == 200


def test_metrics_without_a_metrics_token_stay_open(gateway: SidecarProcess) -> None:
    answer = request(gateway.admin_url, "GET", "/metrics")
    assert answer.status == 200
    assert list(text_string_to_metric_families(answer.body.decode()))


def test_usage_endpoint_takes_admin_token_from_the_config_expanded(
    guarded: SidecarProcess,
) -> None:
    answer = request(guarded.admin_url, "GET", USAGE, headers=bearer(USAGE_TOKEN))
    assert answer.status == 200
    assert (answer.json()["customer"], answer.json()["limit_usd"]) == (SECRET_CUSTOMER, 5.0)


def test_admin_token_in_the_config_overrides_the_environment(guarded: SidecarProcess) -> None:
    answer = request(guarded.admin_url, "GET", USAGE, headers=bearer(ENV_TOKEN))
    assert answer.status == 401
    assert "admin.token" in answer.error["message"]
    assert ENV_TOKEN not in answer.body.decode() and USAGE_TOKEN not in answer.body.decode()


def test_usage_endpoint_falls_back_to_the_environment_token(
    fake_openai: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = openai_config(fake_openai.url, customers={SECRET_CUSTOMER: {}})
    proc = start_sidecar(
        tmp_path_factory.mktemp("envtoken"), config, {"RINGSIDE_ADMIN_TOKEN": ENV_TOKEN}
    ).start()
    try:
        assert request(proc.admin_url, "GET", USAGE, headers=bearer(ENV_TOKEN)).status == 200
        wrong = request(proc.admin_url, "GET", USAGE, headers=bearer(USAGE_TOKEN))
        assert wrong.status == 401 and "RINGSIDE_ADMIN_TOKEN" in wrong.error["message"]
    finally:
        proc.stop()


def test_admin_tokens_never_reach_the_logs(guarded: SidecarProcess) -> None:
    request(guarded.admin_url, "GET", "/metrics", headers=bearer(METRICS_TOKEN))
    request(guarded.admin_url, "GET", USAGE, headers=bearer(USAGE_TOKEN))
    request(guarded.admin_url, "GET", USAGE, headers=bearer(ENV_TOKEN))
    logs = guarded.stdout() + guarded.stderr()
    assert METRICS_TOKEN not in logs and USAGE_TOKEN not in logs and ENV_TOKEN not in logs
