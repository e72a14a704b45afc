"""Reload without a restart (SPEC 5): a changed file is picked up within ~2 s, a bad one is refused
with the old config still serving, SIGHUP reloads on demand, and a Kubernetes ConfigMap's
symlink swap is seen like any other change; requests in flight keep their config."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from sidecar.addons.circuits import CircuitBreakers
from sidecar.addons.metrics import Metrics
from sidecar.addons.usage import UsageWriter
from sidecar.runtime import Runtime, Services
from sidecar.settings import load_settings
from sidecar.stores.budget_memory import MemoryBudgetStore
from sidecar.stores.idempotency_memory import MemoryStore
from tests.conftest import openai_config
from tests.procs import SidecarProcess, wait_until
from tests.support import HELLO, metric, metric_samples, post_chat, request, start_sidecar
from tests.upstreams.openai_fake import FakeOpenAI, Reply

MINI = "fc:openai/gpt-4o-mini"


def slot_status(proc: SidecarProcess, slot: str) -> int:
    return post_chat(proc, {"model": f"slot:{slot}", "messages": HELLO}).status


def reloads(proc: SidecarProcess, result: str) -> float:
    return metric(metric_samples(proc), "ringside_config_reloads_total", result=result)


def with_slot(fake: FakeOpenAI, name: str) -> dict[str, Any]:
    return openai_config(fake.url, slots={name: MINI})


def test_rewritten_config_is_in_force_within_two_seconds(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(with_slot(fake_openai, "old_slot"))
    assert slot_status(proc, "new_slot") == 404
    proc.write_config(with_slot(fake_openai, "new_slot"))
    changed = time.monotonic()
    wait_until(lambda: slot_status(proc, "new_slot") == 200, timeout=2.5, interval=0.1)
    assert time.monotonic() - changed < 2.5
    assert slot_status(proc, "old_slot") == 404
    assert reloads(proc, "success") == 1


def test_bad_new_config_is_refused_and_the_old_one_keeps_serving(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(with_slot(fake_openai, "chat"))
    proc.write_config("slots:\n  chat: [fc:openai/gpt-4o-mini\n")  # not valid YAML
    wait_until(lambda: reloads(proc, "error") == 1, timeout=3, interval=0.1)
    assert slot_status(proc, "chat") == 200
    assert f"{proc.config_path}:" in proc.stderr() and "not valid YAML" in proc.stderr()


def test_semantically_bad_config_is_refused_too(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(with_slot(fake_openai, "chat"))
    bad = openai_config(fake_openai.url, slots={"chat": "fc:ghost/model"})
    proc.write_config(bad)
    wait_until(lambda: reloads(proc, "error") == 1, timeout=3, interval=0.1)
    assert slot_status(proc, "chat") == 200
    assert "slots.chat: fc:ghost/model: unknown provider" in proc.stderr()


def test_fixed_config_after_a_refused_one_is_loaded(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(with_slot(fake_openai, "chat"))
    proc.write_config("providers: 7\n")
    wait_until(lambda: reloads(proc, "error") == 1, timeout=3, interval=0.1)
    proc.write_config(with_slot(fake_openai, "fixed"))
    wait_until(lambda: slot_status(proc, "fixed") == 200, timeout=3, interval=0.1)


def test_sighup_reloads_a_change_the_file_watcher_cannot_see(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(with_slot(fake_openai, "slot_a"))
    path = proc.config_path
    before = os.stat(path)
    text = path.read_text()
    # same inode, same size, same mtime: only SIGHUP can tell the sidecar
    with open(path, "r+") as handle:
        handle.write(text.replace("slot_a", "slot_b"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    time.sleep(1.3)  # longer than the watcher's 1 s poll
    assert slot_status(proc, "slot_b") == 404

    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: slot_status(proc, "slot_b") == 200, timeout=2, interval=0.05)
    assert slot_status(proc, "slot_a") == 404
    assert proc.proc.poll() is None


def test_reload_changes_keys(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    import hashlib

    proc = sidecar_factory(openai_config(fake_openai.url))
    body = {"model": MINI, "messages": HELLO}
    assert post_chat(proc, body).status == 200  # open mode
    digest = hashlib.sha256(b"rk_added_later").hexdigest()
    proc.write_config(openai_config(fake_openai.url, keys=[{"id": "k", "sha256": digest}]))
    wait_until(lambda: post_chat(proc, body).status == 401, timeout=3, interval=0.1)
    assert post_chat(proc, body, {"Authorization": "Bearer rk_added_later"}).status == 200


def configmap_version(volume: Path, version: str, config: dict[str, Any]) -> None:
    """Publish a new version the way the kubelet updates a mounted ConfigMap: write a fresh
    `..<version>` directory, then atomically repoint the `..data` symlink at it."""
    (volume / version).mkdir()
    (volume / version / "ringside.yaml").write_text(yaml.safe_dump(config))
    (volume / "..data_tmp").symlink_to(version)
    os.replace(volume / "..data_tmp", volume / "..data")


def test_configmap_symlink_swap_is_picked_up(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    volume = tmp_path / "configmap"
    volume.mkdir()
    configmap_version(volume, "..v1", with_slot(fake_openai, "old_slot"))
    (volume / "ringside.yaml").symlink_to("..data/ringside.yaml")
    proc = start_sidecar(tmp_path, with_slot(fake_openai, "unused"))
    proc.config_path = volume / "ringside.yaml"  # the pod's view: a symlink into ..data
    proc.start()
    try:
        assert slot_status(proc, "old_slot") == 200
        configmap_version(volume, "..v2", with_slot(fake_openai, "new_slot"))
        wait_until(lambda: slot_status(proc, "new_slot") == 200, timeout=2.5, interval=0.1)
        assert slot_status(proc, "old_slot") == 404
        assert reloads(proc, "success") == 1
    finally:
        proc.stop()


def test_request_in_flight_finishes_with_the_config_it_started_with(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    def versioned(version: str) -> dict[str, Any]:
        config = openai_config(fake_openai.url, slots={"chat": [MINI, "fc:openai/gpt-4o"]})
        config["providers"]["openai"]["headers"] = {"X-Config-Version": version}
        return config

    proc = sidecar_factory(versioned("1"))
    fake_openai.on_model("gpt-4o-mini", Reply(status=500, delay=2.5))
    answers: list[Any] = []
    in_flight = threading.Thread(
        target=lambda: answers.append(post_chat(proc, {"model": "slot:chat", "messages": HELLO}))
    )
    in_flight.start()
    wait_until(lambda: fake_openai.received)
    proc.write_config(versioned("2"))
    wait_until(lambda: reloads(proc, "success") == 1, timeout=2, interval=0.1)
    assert in_flight.is_alive()  # reloaded while the first candidate was still failing
    in_flight.join(10)

    assert [answer.status for answer in answers] == [200]
    # the fallback call was made after the reload, by the config the request started with
    assert [r.headers["X-Config-Version"] for r in fake_openai.received] == ["1", "1"]
    post_chat(proc, {"model": "fc:openai/gpt-4o", "messages": HELLO})
    assert fake_openai.received[-1].headers["X-Config-Version"] == "2"


def scrape_status(proc: SidecarProcess, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return request(proc.admin_url, "GET", "/metrics", headers=headers).status


def test_reload_changes_the_metrics_token(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    old, new = "metrics-token-before-reload", "metrics-token-after-reload"
    proc = sidecar_factory(openai_config(fake_openai.url, admin={"metrics_token": old}))
    assert (scrape_status(proc, old), scrape_status(proc, new)) == (200, 401)

    proc.write_config(openai_config(fake_openai.url, admin={"metrics_token": new}))
    wait_until(lambda: scrape_status(proc, new) == 200, timeout=3, interval=0.1)
    assert scrape_status(proc, old) == 401

    proc.write_config(openai_config(fake_openai.url))  # unset again: open, as without one
    wait_until(lambda: scrape_status(proc, None) == 200, timeout=3, interval=0.1)
    assert proc.proc is not None and proc.proc.poll() is None


def test_reload_changes_the_admin_token(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    old, new = "admin-token-before-reload", "admin-token-after-reload"

    def usage_status(token: str) -> int:
        headers = {"Authorization": f"Bearer {token}"}
        return request(proc.admin_url, "GET", "/v1/customers/c1/usage", headers=headers).status

    proc = sidecar_factory(openai_config(fake_openai.url, admin={"token": old}))
    assert (usage_status(old), usage_status(new)) == (200, 401)
    proc.write_config(openai_config(fake_openai.url, admin={"token": new}))
    wait_until(lambda: usage_status(new) == 200, timeout=3, interval=0.1)
    assert usage_status(old) == 401


# --- a refused reload changes nothing: building a Runtime has no side effects until accepted

NOT_IMPORTABLE = "tests.no_such_module:Thing"  # an addon that fails to load: the config is refused


def circuit_config(upstream_url: str, failures: int, **sections: Any) -> dict[str, Any]:
    config = openai_config(upstream_url, **sections)
    config["providers"]["openai"]["circuit"] = {"failures": failures, "cooldown": 60}
    return config


def circuit_open(proc: SidecarProcess) -> float:
    return metric(metric_samples(proc), "ringside_provider_circuit_open", provider="openai")


def budget_limit(proc: SidecarProcess, customer: str) -> float | None:
    samples = metric_samples(proc)
    return samples.get(("ringside_budget_limit_usd", frozenset({("customer", customer)})))


def test_refused_reload_leaves_the_circuit_settings_in_force(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(circuit_config(fake_openai.url, failures=3))
    proc.write_config(circuit_config(fake_openai.url, failures=1, addons=[NOT_IMPORTABLE]))
    wait_until(lambda: reloads(proc, "error") == 1, timeout=3, interval=0.1)
    fake_openai.script(Reply(status=500))
    assert post_chat(proc, {"model": MINI, "messages": HELLO}).status == 503
    # one failure of three: the refused config's `failures: 1` is not in force
    assert circuit_open(proc) == 0
    assert post_chat(proc, {"model": MINI, "messages": HELLO}).status == 200


def test_refused_reload_shows_no_budget_gauge_of_its_own(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    budgeted = {"cust_new": {"budget": {"usd": 5.0, "period": "month"}}}
    proc = sidecar_factory(openai_config(fake_openai.url))
    proc.write_config(openai_config(fake_openai.url, customers=budgeted, addons=[NOT_IMPORTABLE]))
    wait_until(lambda: reloads(proc, "error") == 1, timeout=3, interval=0.1)
    assert budget_limit(proc, "cust_new") is None


def test_accepted_reload_puts_its_circuit_settings_and_budget_gauges_in_force(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    budgeted = {"cust_new": {"budget": {"usd": 5.0, "period": "month"}}}
    proc = sidecar_factory(circuit_config(fake_openai.url, failures=3))
    assert budget_limit(proc, "cust_new") is None
    proc.write_config(circuit_config(fake_openai.url, failures=1, customers=budgeted))
    wait_until(lambda: reloads(proc, "success") == 1, timeout=3, interval=0.1)
    assert budget_limit(proc, "cust_new") == 5.0
    fake_openai.script(Reply(status=500))
    assert post_chat(proc, {"model": MINI, "messages": HELLO}).status == 503
    assert circuit_open(proc) == 1  # the new `failures: 1`


async def test_building_a_runtime_changes_no_live_state_until_it_is_activated(
    tmp_path: Path,
) -> None:
    config = circuit_config(
        "http://127.0.0.1:9",  # never called
        failures=1,
        customers={"cust_a": {"budget": {"usd": 2.0, "period": "day"}}},
    )
    path = tmp_path / "ringside.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load_settings(str(path), env={"TEST_OPENAI_KEY": "k"})
    metrics = Metrics()
    budgets = MemoryBudgetStore()
    services = Services(
        metrics=metrics,
        circuits=CircuitBreakers(metrics),
        store=MemoryStore(),
        budgets=budgets,
        usage=UsageWriter(budgets),
    )
    runtime = Runtime(settings, services)
    services.circuits.failed("openai")
    assert not services.circuits.is_open("openai")  # the default five failures, still
    limit = {"customer": "cust_a"}
    assert metrics.registry.get_sample_value("ringside_budget_limit_usd", limit) is None

    runtime.activate()
    services.circuits.failed("openai")
    assert services.circuits.is_open("openai")
    assert metrics.registry.get_sample_value("ringside_budget_limit_usd", limit) == 2.0
