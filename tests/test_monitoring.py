"""Metrics as an operator reads them (SPEC 6), and the monitoring manifests in k8s/monitoring."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PROVIDER_KEY, openai_config
from tests.procs import SidecarProcess
from tests.upstreams.openai_fake import FakeOpenAI, Reply

MONITORING = Path(__file__).resolve().parent.parent / "k8s" / "monitoring"
MESSAGES = [{"role": "user", "content": "hello"}]
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: apt-get install prometheus (.ci/run does this)"
)


@pytest.fixture(scope="module")
def gateway(_openai_server: FakeOpenAI, tmp_path_factory: Any) -> Iterator[SidecarProcess]:
    config = openai_config(
        _openai_server.url,
        customers={"acme": {}},
        slots={"chat": ["fc:openai/gpt-4o-mini", "fc:openai/gpt-4o"]},
    )
    proc = SidecarProcess(
        config, {"TEST_OPENAI_KEY": PROVIDER_KEY}, str(tmp_path_factory.mktemp("monitoring"))
    ).start()
    yield proc
    proc.stop()


def samples(proc: SidecarProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(proc.metrics_text()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def test_scripted_traffic_shows_in_every_counter(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key="open-mode", max_retries=0)
    before = samples(gateway)

    client.chat.completions.create(
        model="fc:openai/gpt-4o-mini", messages=MESSAGES, extra_headers={"FC-Customer": "acme"}
    )
    fake_openai.on_model("gpt-4o-mini", Reply(status=503))
    client.chat.completions.create(
        model="slot:chat", messages=MESSAGES, extra_headers={"FC-Customer": "someone-else"}
    )
    fake_openai.on_model("gpt-4o", Reply(status=500))
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="slot:chat", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    after = samples(gateway)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ringside_requests_total", code="200") == 2
    assert delta("ringside_requests_total", code="503") == 1
    assert delta("ringside_requests_total", code="400") == 1
    assert (
        delta(
            "ringside_fallbacks_total",
            from_model="fc:openai/gpt-4o-mini",
            to_model="fc:openai/gpt-4o",
            reason="upstream_unavailable",
        )
        == 2
    )
    assert delta("ringside_cascade_exhausted_total", reason="upstream_unavailable") == 1
    mini, big = "fc:openai/gpt-4o-mini", "fc:openai/gpt-4o"
    assert delta("ringside_upstream_requests_total", provider="openai", model=mini,
                 outcome="success") == 1  # fmt: skip
    assert delta("ringside_upstream_requests_total", provider="openai", model=mini,
                 outcome="upstream_unavailable") == 2  # fmt: skip
    assert delta("ringside_upstream_requests_total", provider="openai", model=big,
                 outcome="success") == 1  # fmt: skip
    assert delta("ringside_tokens_total", provider="openai", model=mini, kind="prompt") == 11
    assert delta("ringside_tokens_total", provider="openai", model=big, kind="completion") == 7
    mini_cost = (11 * 0.15 + 7 * 0.60) / 1e6
    big_cost = (11 * 2.50 + 7 * 10.00) / 1e6
    assert delta("ringside_cost_usd_total", customer="acme", model=mini) == pytest.approx(mini_cost)
    assert delta("ringside_cost_usd_total", customer="_other", model=big) == pytest.approx(big_cost)
    assert delta("ringside_request_duration_seconds_count", stream="false") == 4
    assert delta("ringside_overhead_seconds_count") == 4
    assert delta("ringside_cascade_depth_count") == 3
    assert value(after, "ringside_inflight_requests") == 0


def test_histograms_put_each_observation_in_its_bucket(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model("gpt-4o-mini", Reply(delay=0.3))
    client = openai.OpenAI(base_url=gateway.base_url, api_key="open-mode", max_retries=0)
    before = samples(gateway)

    client.chat.completions.create(model="fc:openai/gpt-4o-mini", messages=MESSAGES)
    after = samples(gateway)

    def delta(le: str) -> float:
        name = "ringside_upstream_duration_seconds_bucket"
        return value(after, name, provider="openai", le=le) - value(
            before, name, provider="openai", le=le
        )

    assert [delta(le) for le in ("0.1", "0.25", "0.5", "1.0", "+Inf")] == [0, 0, 1, 1, 1]
    spent = value(after, "ringside_upstream_duration_seconds_sum", provider="openai") - value(
        before, "ringside_upstream_duration_seconds_sum", provider="openai"
    )
    assert 0.3 <= spent < 0.5
    count = "ringside_upstream_duration_seconds_count"
    assert value(after, count, provider="openai") - value(before, count, provider="openai") == 1


def test_unknown_refs_and_customers_do_not_grow_labels(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key="open-mode", max_retries=0)
    for index in range(3):
        client.chat.completions.create(
            model=f"fc:openai/custom-{index}",
            messages=MESSAGES,
            extra_headers={"FC-Customer": f"tenant-{index}"},
        )
    text = gateway.metrics_text()
    assert "custom-" not in text
    assert "tenant-" not in text
    assert 'model="fc:openai/_other"' in text


def _exposed_names(text: str) -> set[str]:
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.add(name)
        if kind == "histogram":
            names.update({name + "_bucket", name + "_sum", name + "_count"})
    return names


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    return exprs


def test_dashboard_names_only_metrics_the_sidecar_exposes(gateway: SidecarProcess) -> None:
    exposed = _exposed_names(gateway.metrics_text())
    for expr in _dashboard_exprs():
        for name in re.findall(r"\bringside_[a-z_]+", expr):
            assert name in exposed, f"dashboard query names {name}, which is not exposed: {expr}"


def test_dashboard_has_a_datasource_variable() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"


def test_alert_rules_name_only_metrics_the_sidecar_exposes(gateway: SidecarProcess) -> None:
    exposed = _exposed_names(gateway.metrics_text())
    rules = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    for group in rules["spec"]["groups"]:
        for rule in group["rules"]:
            for name in re.findall(r"\bringside_[a-z_]+", rule["expr"]):
                assert name in exposed, f"{rule['alert']} names {name}, not exposed"


@needs_promtool
def test_promtool_accepts_the_alert_rules(tmp_path: Path) -> None:
    rules = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rules["spec"]["groups"]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    records = []
    for index, expr in enumerate(_dashboard_exprs()):
        concrete = expr.replace("$__rate_interval", "5m").replace("$namespace", ".*")
        records.append({"record": f"ringside:dashboard_query_{index}", "expr": concrete})
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_accepts_a_live_scrape(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key="open-mode", max_retries=0)
    client.chat.completions.create(model="fc:openai/gpt-4o-mini", messages=MESSAGES)
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=gateway.metrics_text(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_refusals_and_schema_failures_show_in_their_counters(
    fake_openai: FakeOpenAI, sidecar_factory: Any
) -> None:
    config = openai_config(
        fake_openai.url,
        customers={
            "tight": {"budget": {"usd": 0.0000001, "period": "day"}},
            "limited": {"rate_limit": {"rpm": 1}},
        },
    )
    proc = sidecar_factory(config)
    client = openai.OpenAI(base_url=proc.base_url, api_key="open-mode", max_retries=0)
    mini = "fc:openai/gpt-4o-mini"

    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(
            model=mini, messages=MESSAGES, extra_headers={"FC-Customer": "tight"}
        )
    assert refused.value.status_code == 402

    limited = {"FC-Customer": "limited"}
    client.chat.completions.create(model=mini, messages=MESSAGES, extra_headers=limited)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=mini, messages=MESSAGES, extra_headers=limited)

    fake_openai.on_model("gpt-4o-mini", Reply(content="not json at all"))
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": {"type": "object", "required": ["city"]}},
    }
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=mini, messages=MESSAGES, response_format=schema)

    found = samples(proc)
    assert value(found, "ringside_requests_total", code="402") == 1
    assert value(found, "ringside_requests_total", code="429") == 1
    assert value(found, "ringside_requests_total", code="422") == 1
    assert value(found, "ringside_requests_total", code="200") == 1
    assert value(found, "ringside_budget_exceeded_total", customer="tight") == 1
    assert value(found, "ringside_rate_limited_total", scope="customer") == 1
    assert value(found, "ringside_schema_validations_total", model=mini, result="invalid") == 3
    assert value(found, "ringside_schema_reprompts_total", model=mini) == 2
    assert value(found, "ringside_cascade_exhausted_total",
                 reason="response_schema_validation_failed") == 1  # fmt: skip
    assert value(found, "ringside_budget_limit_usd", customer="tight") == pytest.approx(1e-7)


# -- who can read /metrics: networkpolicy.yaml, the PodMonitor's bearer token -----------------

KUBECTL = shutil.which("kubectl")
MONITORING_NS = {"kubernetes.io/metadata.name": "monitoring"}
APP_NS = {"kubernetes.io/metadata.name": "shop"}


def manifest(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((MONITORING / name).read_text())
    return loaded


def _port_matches(entry: dict[str, Any], port: int, protocol: str) -> bool:
    if entry.get("protocol", "TCP") != protocol:
        return False
    if "port" not in entry:
        return True
    first = entry["port"]
    assert isinstance(first, int), "numbered ports only: the ranges must leave exactly 8788 out"
    return first <= port <= entry.get("endPort", first)


def _peer_matches(peer: dict[str, Any], namespace: dict[str, str]) -> bool:
    assert set(peer) == {"namespaceSelector"}, peer  # no ipBlock, no podSelector here
    selector = peer["namespaceSelector"]
    assert set(selector) == {"matchLabels"}, selector
    return set(selector["matchLabels"].items()) <= set(namespace.items())


def admits(policy: dict[str, Any], port: int, namespace: dict[str, str], protocol: str) -> bool:
    """NetworkPolicy ingress semantics: some rule whose ports and peers both match (an absent
    list matches everything). The pod is isolated, so nothing else gets in."""
    for rule in policy["spec"]["ingress"]:
        ports = rule.get("ports")
        peers = rule.get("from")
        if (ports is None or any(_port_matches(p, port, protocol) for p in ports)) and (
            peers is None or any(_peer_matches(p, namespace) for p in peers)
        ):
            return True
    return False


def test_networkpolicy_selects_the_pods_the_podmonitor_scrapes() -> None:
    policy = manifest("networkpolicy.yaml")
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    selector = manifest("podmonitor.yaml")["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["podSelector"]["matchLabels"] == selector
    assert selector == {"ringside.fightclub.pro/injected": "true"}
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress untouched
    assert "egress" not in policy["spec"]


def test_networkpolicy_admits_the_admin_port_only_from_the_monitoring_namespace() -> None:
    policy = manifest("networkpolicy.yaml")
    assert admits(policy, 8788, MONITORING_NS, "TCP")
    assert not admits(policy, 8788, APP_NS, "TCP")
    assert not admits(policy, 8788, {}, "TCP")  # outside any namespace (another cluster's IP)


@pytest.mark.parametrize("port", [1, 80, 443, 8080, 8787, 8789, 9090, 65535])
def test_networkpolicy_leaves_every_other_port_open_to_everyone(port: int) -> None:
    policy = manifest("networkpolicy.yaml")
    for namespace in (APP_NS, MONITORING_NS, {}):
        assert admits(policy, port, namespace, "TCP")
    assert admits(policy, port, APP_NS, "UDP")


def test_networkpolicy_ranges_are_valid_for_the_api_server() -> None:
    for rule in manifest("networkpolicy.yaml")["spec"]["ingress"]:
        for entry in rule["ports"]:
            assert 1 <= entry["port"] <= entry.get("endPort", entry["port"]) <= 65535, entry
            assert entry["protocol"] in ("TCP", "UDP")


def test_networkpolicy_is_in_the_kustomization_and_says_what_to_adjust() -> None:
    assert "networkpolicy.yaml" in manifest("kustomization.yaml")["resources"]
    text = (MONITORING / "networkpolicy.yaml").read_text()
    assert "ADJUST" in text.split("apiVersion:")[0]  # explained before the manifest starts


def test_podmonitor_sends_the_metrics_token_from_its_secret() -> None:
    [endpoint] = manifest("podmonitor.yaml")["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "ringside-admin" and endpoint["path"] == "/metrics"
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "ringside-metrics-token", "key": "token"},
    }


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not found: the kustomize build is skipped")
def test_kustomize_builds_the_monitoring_bundle() -> None:
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout)}
    assert {"PodMonitor", "PrometheusRule", "ConfigMap", "NetworkPolicy"} <= kinds
