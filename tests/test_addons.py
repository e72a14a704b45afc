"""User addons from the config's `addons:` list, loaded by import path (tests/addons_example.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.conftest import openai_config
from tests.procs import SidecarProcess, wait_until
from tests.support import HELLO, REPO_ROOT, module_sidecar, post_chat, ringside, start_sidecar
from tests.upstreams.openai_fake import FakeOpenAI

MINI = "fc:openai/gpt-4o-mini"
BIG = "fc:openai/gpt-4o"
IMPORTABLE = {"PYTHONPATH": str(REPO_ROOT)}  # the sidecar runs in a temp dir


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    config = openai_config(
        _openai_server.url,
        addons=[
            "tests.addons_example:Lookup",
            "tests.addons_example:Blocklist",
            {"path": "tests.addons_example:TagMetadata", "options": {"team": "search"}},
            {"path": "tests.addons_example:CustomerRequired", "options": {"refs": [BIG]}},
        ],
    )
    yield from module_sidecar(tmp_path_factory.mktemp("addons"), config, IMPORTABLE)


def test_addon_changes_what_the_upstream_receives(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(gateway, {"model": MINI, "messages": HELLO, "metadata": {"a": "1"}})
    assert answer.status == 200
    assert fake_openai.received[0].body["metadata"] == {"a": "1", "team": "search"}


def test_plain_hook_that_returns_an_awaitable_is_waited_for_and_the_chain_goes_on(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(gateway, {"model": MINI, "messages": HELLO}, {"X-Lookup": "found"})
    assert answer.status == 200
    # Lookup's wait ended before the upstream call, and TagMetadata (after it) still ran
    assert fake_openai.received[0].body["metadata"] == {"lookup": "found", "team": "search"}


def test_plain_hook_returning_something_else_than_an_awaitable_is_not_awaited(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(gateway, {"model": MINI, "messages": HELLO}, {"X-Lookup": "cached"})
    assert answer.status == 200
    assert fake_openai.received[0].body["metadata"] == {"team": "search"}


def test_answer_set_after_an_awaited_hook_ends_the_chain(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    body = {"model": MINI, "messages": [{"role": "user", "content": "forbidden"}]}
    answer = post_chat(gateway, body, {"X-Lookup": "deny"})
    assert answer.status == 403  # Lookup's answer, not Blocklist's 451: Blocklist never ran
    assert answer.error["code"] == "denied"
    assert fake_openai.received == []


def test_addon_short_circuits_without_calling_the_upstream(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    body = {"model": MINI, "messages": [{"role": "user", "content": "a forbidden topic"}]}
    answer = post_chat(gateway, body, {"X-Request-Id": "blocked-1"})
    assert answer.status == 451
    assert answer.error["code"] == "blocked"
    assert fake_openai.received == []


def test_short_circuited_request_is_logged_with_its_status(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    body = {"model": MINI, "messages": [{"role": "user", "content": "forbidden"}]}
    answer = post_chat(gateway, body, {"X-Request-Id": "blocked-logged"})
    assert answer.headers["X-Request-Id"] == "blocked-logged"
    line = wait_until(
        lambda: [r for r in gateway.access_log() if r["request_id"] == "blocked-logged"]
    )[0]
    assert line["status"] == 451


def test_addon_raising_a_gateway_error_answers_the_openai_envelope(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(gateway, {"model": BIG, "messages": HELLO})
    assert answer.status == 400
    assert answer.error["code"] == "customer_required"
    assert answer.error["param"] == "FC-Customer"
    assert answer.headers["X-Ringside-Models-Tried"] == ""
    assert fake_openai.received == []
    ok = post_chat(gateway, {"model": BIG, "messages": HELLO}, {"FC-Customer": "c1"})
    assert ok.status == 200


def test_addon_that_cannot_be_imported_stops_serve_with_a_message(
    fake_openai: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = openai_config(fake_openai.url, addons=["tests.no_such_module:Thing"])
    proc = start_sidecar(tmp_path_factory.mktemp("bad-addon"), config, IMPORTABLE)
    with pytest.raises(RuntimeError, match=r"tests\.no_such_module:Thing"):
        proc.start()
    assert proc.proc is not None and proc.proc.returncode == 2


def test_check_config_refuses_an_addon_that_cannot_be_imported(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    path = tmp_path_factory.mktemp("check-addon") / "ringside.yaml"
    path.write_text("addons:\n  - tests.addons_example:Blocklist\n  - tests.addons_example:Nope\n")
    result = ringside("check-config", str(path))
    assert result.returncode != 0
    assert "addons[1]" in result.stderr and "tests.addons_example:Nope" in result.stderr
    assert "addons[0]" not in result.stderr


def test_addon_with_a_bad_option_is_refused_on_reload(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(openai_config(fake_openai.url, slots={"chat": MINI}), IMPORTABLE)
    bad = openai_config(
        fake_openai.url,
        slots={"chat": MINI},
        addons=[{"path": "tests.addons_example:TagMetadata", "options": {"colour": "red"}}],
    )
    proc.write_config(bad)
    wait_until(lambda: "cannot load tests.addons_example:TagMetadata" in proc.stderr(), timeout=3)
    assert post_chat(proc, {"model": "slot:chat", "messages": HELLO}).status == 200
