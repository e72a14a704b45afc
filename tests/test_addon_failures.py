"""An addon that raises (SPEC 6.1): in an observing hook it is logged and counted and the client
gets the answer it would have got; in a deciding hook the request ends `500 internal_error` in
the envelope with its request id; a method named like a hook but not one is refused at load."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from sidecar import pipeline as pipeline_module
from sidecar.addons.accesslog import AccessLog
from sidecar.addons.auth import Auth
from sidecar.addons.budget import BudgetAddon
from sidecar.addons.circuits import CircuitAddon
from sidecar.addons.idempotency import Idempotency
from sidecar.addons.metrics import Metrics, MetricsAddon
from sidecar.addons.ratelimit import RateLimits
from sidecar.addons.usage import UsageAddon
from sidecar.errors import CandidateRefused, GatewayError, Outcome
from sidecar.flow import Flow
from sidecar.pipeline import HOOKS, Pipeline, load_addon
from sidecar.settings import ConfigError
from sidecar.settings.model import AddonSpec
from tests.conftest import openai_config
from tests.procs import SidecarProcess, wait_until
from tests.support import (
    HELLO,
    REPO_ROOT,
    metric,
    metric_samples,
    module_sidecar,
    post_chat,
    ringside,
    sse_events,
    start_sidecar,
)
from tests.upstreams.openai_fake import FakeOpenAI

MINI = "fc:openai/gpt-4o-mini"
FAULTY = "tests.addons_example:Faulty"
IMPORTABLE = {"PYTHONPATH": str(REPO_ROOT)}  # the sidecar runs in a temp dir


# --- end to end: a sidecar with tests.addons_example:Faulty, which raises where told to


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    config = openai_config(_openai_server.url, addons=[FAULTY])
    yield from module_sidecar(tmp_path_factory.mktemp("faulty"), config, IMPORTABLE)


def failing(hooks: str, request_id: str) -> dict[str, str]:
    return {"X-Faulty": hooks, "X-Request-Id": request_id}


def logged(proc: SidecarProcess, request_id: str) -> dict[str, Any]:
    lines = wait_until(lambda: [r for r in proc.access_log() if r["request_id"] == request_id])
    assert len(lines) == 1
    return cast(dict[str, Any], lines[0])


def addon_errors(proc: SidecarProcess, hook: str) -> float:
    samples = metric_samples(proc)
    return metric(samples, "ringside_addon_errors_total", addon=FAULTY, hook=hook)


def test_error_hook_that_raises_leaves_the_clients_400_as_it_was(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    before = addon_errors(gateway, "error")
    answer = post_chat(gateway, {"model": "gpt-4o", "messages": HELLO}, failing("error", "f-err"))
    assert answer.status == 400
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.error["code"] == "invalid_model_ref"
    assert answer.headers["X-Request-Id"] == "f-err"
    assert logged(gateway, "f-err")["status"] == 400
    assert addon_errors(gateway, "error") == before + 1
    assert f"addon {FAULTY} raised in its error hook (request f-err)" in gateway.stderr()
    assert "RuntimeError: Faulty.error is broken" in gateway.stderr()  # with its traceback


@pytest.mark.parametrize(
    "hooks", ["attempt_done", "response", "done", "attempt_done,response,done"]
)
def test_observing_hook_that_raises_changes_nothing_the_client_receives(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, hooks: str
) -> None:
    before = {hook: addon_errors(gateway, hook) for hook in hooks.split(",")}
    request_id = f"f-obs-{hooks.replace(',', '-')}"
    answer = post_chat(gateway, {"model": MINI, "messages": HELLO}, failing(hooks, request_id))
    assert answer.status == 200
    assert answer.json()["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    assert answer.headers["X-Ringside-Model-Used"] == MINI
    assert logged(gateway, request_id)["status"] == 200  # the access log's done hook still ran
    for hook, count in before.items():
        assert addon_errors(gateway, hook) == count + 1
        # logged once a minute per addon and hook: this request's, or an earlier test's
        assert f"addon {FAULTY} raised in its {hook} hook (request f-obs-" in gateway.stderr()


def test_observing_hooks_that_raise_after_a_stream_leave_it_whole(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    body = {"model": MINI, "messages": HELLO, "stream": True}
    answer = post_chat(gateway, body, failing("attempt_done,response,done", "f-stream"))
    assert answer.status == 200
    events = sse_events(answer.body)
    assert events[-1] == "[DONE]"
    text = "".join(
        chunk["choices"][0]["delta"].get("content") or ""
        for chunk in map(json.loads, events[:-1])
        if chunk["choices"]
    )
    assert text == "Hello from the fake upstream."
    assert logged(gateway, "f-stream")["status"] == 200


@pytest.mark.parametrize("hook", ["headers", "request", "routed", "attempt"])
def test_deciding_hook_that_raises_ends_the_request_with_500_internal_error(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, hook: str
) -> None:
    before = addon_errors(gateway, hook)
    request_id = f"f-decide-{hook}"
    answer = post_chat(gateway, {"model": MINI, "messages": HELLO}, failing(hook, request_id))
    assert answer.status == 500
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.error["code"] == "internal_error"
    assert request_id in answer.error["message"]
    assert answer.headers["X-Request-Id"] == request_id
    assert fake_openai.received == []  # a deciding hook runs before the upstream call
    assert logged(gateway, request_id)["status"] == 500
    assert addon_errors(gateway, hook) == before + 1
    assert f"addon {FAULTY} raised in its {hook} hook (request {request_id})" in gateway.stderr()


def test_misspelt_hook_stops_serve_naming_the_addon_the_method_and_the_hook(
    fake_openai: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = openai_config(fake_openai.url, addons=["tests.addons_example:Misspelt"])
    proc = start_sidecar(tmp_path_factory.mktemp("misspelt"), config, IMPORTABLE)
    with pytest.raises(RuntimeError, match=r"tests\.addons_example:Misspelt") as raised:
        proc.start()
    assert "requests()" in str(raised.value) and "request()" in str(raised.value)
    assert proc.proc is not None and proc.proc.returncode == 2


def test_check_config_refuses_a_misspelt_hook(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("check-misspelt") / "ringside.yaml"
    path.write_text("addons:\n  - tests.addons_example:Misspelt\n")
    result = ringside("check-config", str(path))
    assert result.returncode != 0
    assert "addons[0]" in result.stderr and "tests.addons_example:Misspelt" in result.stderr
    assert "requests()" in result.stderr and "did you mean request()" in result.stderr


def test_misspelt_hook_is_refused_on_reload_and_the_old_config_keeps_serving(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    proc = sidecar_factory(openai_config(fake_openai.url), IMPORTABLE)
    proc.write_config(openai_config(fake_openai.url, addons=["tests.addons_example:Misspelt"]))
    wait_until(lambda: "did you mean request()" in proc.stderr(), timeout=3)
    assert metric(metric_samples(proc), "ringside_config_reloads_total", result="error") == 1
    assert post_chat(proc, {"model": MINI, "messages": HELLO}).status == 200


# --- in process: the Pipeline with a Flow built here


def make_flow(request_id: str = "req-1") -> Flow:
    return Flow(
        id=request_id,
        headers=cast(Any, {}),
        client_ip="127.0.0.1",
        body={},
        body_bytes=0,
    )


class Recorder:
    """Notes every hook it sees in flow.metadata['seen']."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _note(self, flow: Flow, hook: str) -> None:
        flow.metadata.setdefault("seen", []).append(f"{self.name}.{hook}")


def recording(name: str) -> object:
    recorder = Recorder(name)
    for hook in HOOKS:
        setattr(recorder, hook, lambda flow, *args, _hook=hook: recorder._note(flow, _hook))
    return recorder


class Raises:
    """Raises `exc` in every hook; `awaited=True`: from a coroutine, when it is awaited."""

    def __init__(self, exc: BaseException, awaited: bool = False) -> None:
        def sync_hook(flow: Flow, *args: object) -> None:
            raise exc

        async def async_hook(flow: Flow, *args: object) -> None:
            raise exc

        for hook in HOOKS:
            setattr(self, hook, async_hook if awaited else sync_hook)


def counted(metrics: Metrics, hook: str, addon: str) -> float | None:
    metrics.tally.flush()
    return metrics.registry.get_sample_value(
        "ringside_addon_errors_total", {"addon": addon, "hook": hook}
    )


RAISES = f"{__name__}:Raises"
OBSERVING = ["attempt_done", "response", "error", "done"]
DECIDING = ["headers", "request", "routed", "attempt"]


async def run(pipeline: Pipeline, hook: str, flow: Flow) -> None:
    args = (object(),) if hook in ("attempt", "attempt_done") else ()
    await pipeline.run(hook, flow, *args)


@pytest.mark.parametrize("awaited", [False, True], ids=["plain", "async"])
@pytest.mark.parametrize("hook", OBSERVING)
async def test_observing_hook_exception_is_logged_counted_and_the_chain_goes_on(
    hook: str, awaited: bool, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    pipeline = Pipeline(
        [recording("first"), Raises(ValueError("boom"), awaited), recording("last")], metrics
    )
    flow = make_flow("obs-1")
    with caplog.at_level(logging.ERROR, logger="ringside"):
        await run(pipeline, hook, flow)
    assert flow.metadata["seen"] == [f"first.{hook}", f"last.{hook}"]
    assert flow.error is None and flow.response is None
    assert counted(metrics, hook, RAISES) == 1
    assert f"addon {RAISES} raised in its {hook} hook (request obs-1)" in caplog.text
    assert "ValueError: boom" in caplog.text


@pytest.mark.parametrize("hook", OBSERVING)
async def test_gateway_error_from_an_observing_hook_is_a_failure_too(hook: str) -> None:
    metrics = Metrics()
    refusal = GatewayError(400, "nope", "an observer cannot answer")
    pipeline = Pipeline([Raises(refusal), recording("last")], metrics)
    flow = make_flow()
    await run(pipeline, hook, flow)
    assert flow.metadata["seen"] == [f"last.{hook}"]
    assert counted(metrics, hook, RAISES) == 1


@pytest.mark.parametrize("awaited", [False, True], ids=["plain", "async"])
@pytest.mark.parametrize("hook", DECIDING)
async def test_deciding_hook_exception_is_a_500_internal_error_with_the_request_id(
    hook: str, awaited: bool, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    pipeline = Pipeline([Raises(KeyError("k"), awaited), recording("last")], metrics)
    flow = make_flow("dec-1")
    with caplog.at_level(logging.ERROR, logger="ringside"), pytest.raises(GatewayError) as raised:
        await run(pipeline, hook, flow)
    assert (raised.value.status, raised.value.code) == (500, "internal_error")
    assert "dec-1" in raised.value.message
    assert isinstance(raised.value.__cause__, KeyError)
    assert "seen" not in flow.metadata  # the chain ended there
    assert counted(metrics, hook, RAISES) == 1
    assert f"addon {RAISES} raised in its {hook} hook (request dec-1)" in caplog.text


@pytest.mark.parametrize("awaited", [False, True], ids=["plain", "async"])
@pytest.mark.parametrize(
    "error",
    [
        GatewayError(403, "denied", "an addon's own answer"),
        CandidateRefused(GatewayError(402, "budget_exceeded", "no"), Outcome.BUDGET),
    ],
    ids=["GatewayError", "CandidateRefused"],
)
@pytest.mark.parametrize("hook", DECIDING)
async def test_gateway_error_from_a_deciding_hook_is_the_addons_answer(
    hook: str, error: GatewayError, awaited: bool
) -> None:
    metrics = Metrics()
    pipeline = Pipeline([Raises(error, awaited), recording("last")], metrics)
    with pytest.raises(GatewayError) as raised:
        await run(pipeline, hook, make_flow())
    assert raised.value is error
    assert counted(metrics, hook, RAISES) is None


async def test_repeated_failures_are_all_counted_but_logged_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    pipeline = Pipeline([Raises(ValueError("again"))], metrics)
    with caplog.at_level(logging.ERROR, logger="ringside"):
        for index in range(5):
            await pipeline.run("done", make_flow(f"rep-{index}"))
    assert counted(metrics, "done", RAISES) == 5
    assert caplog.text.count("raised in its done hook") == 1


async def test_pipeline_without_metrics_still_logs_and_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pipeline = Pipeline([Raises(ValueError("no metrics")), recording("last")])
    flow = make_flow()
    with caplog.at_level(logging.ERROR, logger="ringside"):
        await pipeline.run("done", flow)
    assert flow.metadata["seen"] == ["last.done"]
    assert "no metrics" in caplog.text


# --- hook names: close to a hook's but not one → refused at load


class Spelling:
    pass


@pytest.mark.parametrize(
    ("method", "meant"),
    [
        ("requests", "request"),
        ("on_request", "request"),
        ("onRequest", "request"),
        ("attempt_start", "attempt"),
        ("attempt_end", "attempt_done"),
        ("attemptdone", "attempt_done"),
        ("Done", "done"),
        ("respone", "response"),
        ("header", "headers"),
        ("errors", "error"),
        ("request_done", "done"),
        ("requestheaders", "headers"),  # mitmproxy's name
    ],
)
def test_method_named_close_to_a_hook_is_reported(method: str, meant: str) -> None:
    addon = type("Spelling", (), {method: lambda self, flow: None})()
    (problem,) = pipeline_module.misspelt_hooks(addon)
    assert f"{method}()" in problem and f"did you mean {meant}()" in problem


@pytest.mark.parametrize(
    "method",
    [
        "_requests",  # private: a helper by convention
        "request_id",
        "requester",
        "respond",
        "router",
        "rerouted",
        "refresh",
        "handle_error",
        "one",
        "close",
    ],
)
def test_ordinary_helper_methods_are_not_reported(method: str) -> None:
    addon = type("Helpers", (), {method: lambda self: None})()
    assert pipeline_module.misspelt_hooks(addon) == []


def test_attributes_that_are_not_methods_are_not_reported() -> None:
    addon = type("Data", (), {"requests": [], "Done": 0})()
    assert pipeline_module.misspelt_hooks(addon) == []


def test_built_in_addons_have_no_misspelt_hooks() -> None:
    for cls in (
        AccessLog, Auth, BudgetAddon, CircuitAddon, Idempotency, MetricsAddon, RateLimits,
        UsageAddon,
    ):  # fmt: skip
        assert pipeline_module.misspelt_hooks(cls.__new__(cls)) == [], cls


def test_load_addon_refuses_a_misspelt_hook_with_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"requests\(\).*did you mean request\(\)"):
        load_addon(AddonSpec("tests.addons_example:Misspelt"))


def test_an_attempt_hook_that_raises_after_the_budget_reserved_leaves_nothing_held(
    fake_openai: FakeOpenAI, sidecar_factory: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    from tests.test_budget import ADMIN_ENV, BODY, budget_config, usage_of

    storage = {"backend": "sqlite", "sqlite_path": str(tmp_path / "books.db")}
    config = budget_config(fake_openai.url, storage, acme=1.0)
    config["addons"] = [FAULTY]  # after the built-in budget addon: it raises past the reserve
    proc = sidecar_factory(config, {**ADMIN_ENV, **IMPORTABLE})

    answer = post_chat(proc, BODY, {"FC-Customer": "acme", **failing("attempt", "req-held")})

    assert answer.status == 500 and answer.error["code"] == "internal_error"
    assert fake_openai.received == []
    # the request's hold is released: the budget lease it was admitted on is idle and given
    # back (storage.budget_lease_idle, 2 s; a hold never released would keep it for the TTL)
    report = wait_until(
        lambda: (u := usage_of(proc, "acme"))["requests"] == 1 and u["reserved_usd"] == 0 and u,
        8,
    )
    assert report["spent_usd"] == 0
