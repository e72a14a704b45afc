"""Cascades (SPEC 2.2): which upstream failures escalate, which return at once, and the headers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
import yaml

from tests.conftest import PROVIDER_KEY
from tests.procs import SidecarProcess, free_port
from tests.support import post_chat, ringside
from tests.upstreams.openai_fake import FakeOpenAI, Reply


def _model(price_in: float, price_out: float, context: int = 128000) -> dict[str, Any]:
    return {
        "input_per_mtok": price_in,
        "output_per_mtok": price_out,
        "context": context,
        "max_output": 4096,
        "caps": ["tools"],
    }


def cascade_config(upstream: str) -> dict[str, Any]:
    never_open = {"failures": 1000, "cooldown": 1}
    return {
        "storage": {"backend": "memory"},
        "providers": {
            "openai": {
                "kind": "openai",
                "base_url": upstream,
                "api_key_env": "TEST_OPENAI_KEY",
                "timeout": {"connect": 1, "read": 2},
                "circuit": never_open,
            },
            "slow": {
                "kind": "openai",
                "base_url": upstream,
                "api_key_env": "TEST_OPENAI_KEY",
                "timeout": {"connect": 1, "read": 0.4},
                "circuit": never_open,
            },
            "dead": {
                "kind": "openai",
                "base_url": f"http://127.0.0.1:{free_port()}/v1",
                "timeout": {"connect": 1, "read": 1},
                "circuit": never_open,
            },
        },
        "models": {
            "fc:openai/cheap": _model(0.1, 0.4),
            "fc:openai/mid": _model(1.0, 4.0),
            "fc:openai/big": _model(5.0, 15.0),
            "fc:openai/tiny-window": _model(0.05, 0.1, context=50),
            "fc:slow/sleepy": _model(0.1, 0.4),
            "fc:dead/gone": _model(0.1, 0.4),
        },
    }


@pytest.fixture(scope="module")
def gateway(_openai_server: FakeOpenAI, tmp_path_factory: Any) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(
        cascade_config(_openai_server.url),
        {"TEST_OPENAI_KEY": PROVIDER_KEY},
        str(tmp_path_factory.mktemp("cascade")),
    ).start()
    yield proc
    proc.stop()


@pytest.fixture
def client(gateway: SidecarProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="open-mode", max_retries=0)


MESSAGES = [{"role": "user", "content": "hello"}]


def create_raw(client: openai.OpenAI, model: Any, **extra: Any) -> Any:
    return client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, **extra)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429, 401, 403])
def test_upstream_status_escalates_to_the_next_model(
    client: openai.OpenAI, fake_openai: FakeOpenAI, status: int
) -> None:
    fake_openai.on_model("cheap", Reply(status=status, error_message=f"boom {status}"))
    raw = create_raw(client, ["fc:openai/cheap", "fc:openai/mid"])
    assert raw.status_code == 200
    assert raw.headers["X-Ringside-Model-Used"] == "fc:openai/mid"
    assert raw.headers["X-Ringside-Models-Tried"] == "fc:openai/cheap,fc:openai/mid"
    assert raw.headers["X-Ringside-Fallback-Triggered"] == "true"
    assert raw.parse().model == "mid"
    assert fake_openai.models_called() == ["cheap", "mid"]


def test_timeout_escalates(client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    fake_openai.on_model("sleepy", Reply(delay=1.5))
    raw = create_raw(client, ["fc:slow/sleepy", "fc:openai/mid"])
    assert raw.headers["X-Ringside-Model-Used"] == "fc:openai/mid"
    assert fake_openai.models_called() == ["sleepy", "mid"]


def test_connection_refused_escalates(client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    raw = create_raw(client, ["fc:dead/gone", "fc:openai/cheap"])
    assert raw.headers["X-Ringside-Model-Used"] == "fc:openai/cheap"
    assert raw.headers["X-Ringside-Models-Tried"] == "fc:dead/gone,fc:openai/cheap"


def test_connection_reset_escalates(client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    fake_openai.on_model("cheap", Reply(reset=True))
    raw = create_raw(client, ["fc:openai/cheap", "fc:openai/mid"])
    assert raw.headers["X-Ringside-Model-Used"] == "fc:openai/mid"
    assert raw.headers["X-Ringside-Models-Tried"] == "fc:openai/cheap,fc:openai/mid"
    assert fake_openai.models_called() == ["cheap", "mid"]


@pytest.mark.parametrize(
    "body", [b"this is not json", b'{"no": "choices"}', b"[1, 2, 3]"], ids=["text", "shape", "list"]
)
def test_unparseable_upstream_body_escalates(
    client: openai.OpenAI, fake_openai: FakeOpenAI, body: bytes
) -> None:
    fake_openai.on_model("cheap", Reply(raw_body=body))
    raw = create_raw(client, ["fc:openai/cheap", "fc:openai/mid"])
    assert raw.headers["X-Ringside-Model-Used"] == "fc:openai/mid"
    assert raw.headers["X-Ringside-Fallback-Triggered"] == "true"
    assert fake_openai.models_called() == ["cheap", "mid"]
    assert raw.parse().choices[0].message.content == "Hello from the fake upstream."


def test_context_length_error_escalates(client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    fake_openai.on_model(
        "cheap",
        Reply(
            status=400,
            error_code="context_length_exceeded",
            error_type="invalid_request_error",
            error_message="This model's maximum context length is 8192 tokens.",
        ),
    )
    raw = create_raw(client, ["fc:openai/cheap", "fc:openai/big"])
    assert raw.headers["X-Ringside-Model-Used"] == "fc:openai/big"
    assert fake_openai.models_called() == ["cheap", "big"]


@pytest.mark.parametrize("status", [400, 404, 422])
def test_client_fault_returns_at_once_with_the_upstream_status(
    client: openai.OpenAI, fake_openai: FakeOpenAI, status: int
) -> None:
    fake_openai.on_model(
        "cheap",
        Reply(
            status=status,
            error_code="invalid_value",
            error_type="invalid_request_error",
            error_message="logit_bias has an invalid token id",
        ),
    )
    with pytest.raises(openai.APIStatusError) as caught:
        create_raw(client, ["fc:openai/cheap", "fc:openai/mid"])
    error = caught.value
    assert error.status_code == status
    assert error.body == {
        "message": "logit_bias has an invalid token id",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_value",
    }
    assert error.response.headers["X-Ringside-Models-Tried"] == "fc:openai/cheap"
    assert error.response.headers["X-Ringside-Fallback-Triggered"] == "false"
    assert "X-Ringside-Model-Used" not in error.response.headers
    assert fake_openai.models_called() == ["cheap"]


def test_small_context_window_is_skipped_without_a_call(
    client: openai.OpenAI, fake_openai: FakeOpenAI
) -> None:
    long_prompt = [{"role": "user", "content": "word " * 400}]
    raw = client.chat.completions.with_raw_response.create(
        model=["fc:openai/tiny-window", "fc:openai/cheap"], messages=long_prompt
    )
    assert raw.headers["X-Ringside-Model-Used"] == "fc:openai/cheap"
    assert raw.headers["X-Ringside-Models-Tried"] == "fc:openai/cheap"
    assert fake_openai.models_called() == ["cheap"]


def test_repeated_refs_are_tried_once(client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    fake_openai.on_model("cheap", Reply(status=503))
    with pytest.raises(openai.APIStatusError) as caught:
        create_raw(client, ["fc:openai/cheap", "fc:openai/cheap", "fc:openai/cheap"])
    assert caught.value.status_code == 503
    assert fake_openai.models_called() == ["cheap"]


def test_every_candidate_failing_is_503_naming_each(
    client: openai.OpenAI, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model("cheap", Reply(status=500, error_message="cheap exploded"))
    fake_openai.on_model("mid", Reply(status=429, error_message="mid is busy"))
    with pytest.raises(openai.APIStatusError) as caught:
        create_raw(client, ["fc:openai/cheap", "fc:openai/mid"])
    error = caught.value
    assert error.status_code == 503
    assert isinstance(error.body, dict)
    assert error.body["code"] == "upstream_unavailable"
    assert "cheap exploded" in error.body["message"]
    assert "mid is busy" in error.body["message"]
    headers = error.response.headers
    assert headers["X-Ringside-Models-Tried"] == "fc:openai/cheap,fc:openai/mid"
    assert headers["X-Ringside-Fallback-Triggered"] == "true"
    assert "X-Ringside-Model-Used" not in headers


def test_first_model_answering_does_not_trigger_fallback(
    client: openai.OpenAI, fake_openai: FakeOpenAI
) -> None:
    raw = create_raw(client, ["fc:openai/cheap", "fc:openai/mid"])
    assert raw.headers["X-Ringside-Model-Used"] == "fc:openai/cheap"
    assert raw.headers["X-Ringside-Fallback-Triggered"] == "false"
    assert fake_openai.models_called() == ["cheap"]


def test_match_with_n_runs_as_a_cheapest_first_cascade(
    client: openai.OpenAI, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model("tiny-window", Reply(status=503))
    fake_openai.on_model("cheap", Reply(status=503))
    raw = create_raw(client, "match:provider=openai,n=3")
    assert raw.headers["X-Ringside-Models-Tried"] == (
        "fc:openai/tiny-window,fc:openai/cheap,fc:openai/mid"
    )
    assert raw.headers["X-Ringside-Model-Used"] == "fc:openai/mid"


def test_cascade_with_stream_is_refused(client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=["fc:openai/cheap", "fc:openai/mid"], messages=MESSAGES, stream=True
        )
    assert caught.value.code == "fallback_with_stream_unsupported"
    assert fake_openai.received == []


def test_cascade_with_idempotency_key_is_refused(
    client: openai.OpenAI, fake_openai: FakeOpenAI
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=["fc:openai/cheap", "fc:openai/mid"],
            messages=MESSAGES,
            extra_headers={"Idempotency-Key": "abc-123"},
        )
    assert caught.value.code == "fallback_with_idempotency_unsupported"
    assert fake_openai.received == []


def test_fallback_metrics_name_the_pair_and_reason(
    gateway: SidecarProcess, client: openai.OpenAI, fake_openai: FakeOpenAI
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def fallbacks() -> float:
        for family in text_string_to_metric_families(gateway.metrics_text()):
            for sample in family.samples:
                if sample.name == "ringside_fallbacks_total" and sample.labels == {
                    "from_model": "fc:openai/big",
                    "to_model": "fc:openai/mid",
                    "reason": "upstream_unavailable",
                }:
                    return sample.value
        return 0.0

    before = fallbacks()
    fake_openai.on_model("big", Reply(status=502))
    create_raw(client, ["fc:openai/big", "fc:openai/mid"])
    assert fallbacks() == before + 1


def test_every_candidate_too_small_for_the_prompt_is_400_context_length_exceeded(
    client: openai.OpenAI, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model(
        "cheap",
        Reply(status=400, error_code="context_length_exceeded",
              error_message="This model's maximum context length is 8192 tokens."),
    )  # fmt: skip
    long_prompt = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=["fc:openai/tiny-window", "fc:openai/cheap"], messages=long_prompt
        )
    error = caught.value
    assert (error.code, error.param) == ("context_length_exceeded", "messages")
    assert isinstance(error.body, dict) and error.body["type"] == "invalid_request_error"
    assert "fc:openai/tiny-window: skipped" in error.body["message"]
    assert "maximum context length is 8192" in error.body["message"]
    assert fake_openai.models_called() == ["cheap"]  # the small window was never called


def test_a_503_says_not_to_retry_and_the_sdk_obeys(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model("cheap", Reply(status=500))
    patient = openai.OpenAI(base_url=gateway.base_url, api_key="open-mode", max_retries=3)
    with pytest.raises(openai.InternalServerError) as caught:
        patient.chat.completions.create(model="fc:openai/cheap", messages=MESSAGES)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert "Retry-After" not in caught.value.response.headers
    assert fake_openai.models_called() == ["cheap"]  # one run, not four


@pytest.mark.parametrize(("asked", "hinted"), [("3", "3"), ("2.2", "3"), ("600", "10")])
def test_a_503_carries_the_largest_retry_after_an_upstream_asked_for_capped(
    client: openai.OpenAI, fake_openai: FakeOpenAI, asked: str, hinted: str
) -> None:
    fake_openai.on_model("cheap", Reply(status=429, headers={"Retry-After": "1"}))
    fake_openai.on_model("mid", Reply(status=503, headers={"Retry-After": asked}))
    with pytest.raises(openai.InternalServerError) as caught:
        create_raw(client, ["fc:openai/cheap", "fc:openai/mid"])
    headers = caught.value.response.headers
    assert headers["Retry-After"] == hinted  # retry_after_cap: 10 s by default
    assert "x-should-retry" not in headers


def test_a_provider_rejecting_the_gateways_key_is_not_quoted_to_the_client(
    sidecar_factory: Callable[..., SidecarProcess], fake_openai: FakeOpenAI
) -> None:
    gateway = sidecar_factory(cascade_config(fake_openai.url))
    client = openai.OpenAI(base_url=gateway.base_url, api_key="open-mode", max_retries=0)
    rejection = Reply(
        status=401, error_type="invalid_request_error", error_code="invalid_api_key",
        error_message=f"Incorrect API key provided: {PROVIDER_KEY}. You can find your API key "
        "at https://platform.openai.com/account/api-keys.",
    )  # fmt: skip
    fake_openai.on_model("big", rejection)
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="fc:openai/big", messages=MESSAGES, stream=stream)
        raw = caught.value.response.text
        assert caught.value.status_code == 503
        assert PROVIDER_KEY not in raw and "Incorrect API key" not in raw
        assert "the provider rejected the gateway's credentials (HTTP 401)" in raw
    log = gateway.stderr()
    assert PROVIDER_KEY not in log
    lines = [line for line in log.splitlines() if "rejected the gateway's credentials" in line]
    assert len(lines) == 1  # once a minute per provider, whatever the number of requests
    assert "provider openai" in lines[0] and "Incorrect API key provided: [REDACTED]" in lines[0]


def test_a_circuit_opened_by_a_cascades_own_failures_skips_the_rest_of_it(
    sidecar_factory: Callable[..., SidecarProcess], fake_openai: FakeOpenAI
) -> None:
    config = cascade_config(fake_openai.url)
    config["providers"]["openai"]["circuit"] = {"failures": 2, "cooldown": 60}
    gateway = sidecar_factory(config)
    client = openai.OpenAI(base_url=gateway.base_url, api_key="open-mode", max_retries=0)
    refs = [f"fc:openai/failing-{i}" for i in range(6)]
    for ref in refs:
        fake_openai.on_model(ref.removeprefix("fc:openai/"), Reply(status=500))

    with pytest.raises(openai.InternalServerError) as caught:
        create_raw(client, refs)

    assert fake_openai.models_called() == ["failing-0", "failing-1"]  # not six calls
    message = caught.value.response.json()["error"]["message"]
    assert message.count("skipped, provider circuit open") == 4
    assert caught.value.response.headers["X-Ringside-Models-Tried"] == ",".join(refs[:2])


@pytest.mark.parametrize("status", [301, 307, 308])
def test_an_upstream_redirect_is_not_followed_and_escalates(
    client: openai.OpenAI, fake_openai: FakeOpenAI, status: int
) -> None:
    moved = Reply(status=status, raw_body=b"", headers={"Location": "http://127.0.0.1:9/v1"})
    fake_openai.on_model("cheap", moved)
    raw = create_raw(client, ["fc:openai/cheap", "fc:openai/mid"])
    assert raw.headers["X-Ringside-Model-Used"] == "fc:openai/mid"
    with pytest.raises(openai.InternalServerError) as caught:
        create_raw(client, "fc:openai/cheap")
    assert caught.value.status_code == 503
    assert f"upstream answered HTTP {status}" in caught.value.message
    assert "base_url" in caught.value.message
    assert "Location" not in caught.value.response.headers
    assert fake_openai.models_called() == ["cheap", "mid", "cheap"]


@pytest.mark.parametrize("count", [9, 10_000])
def test_a_model_array_longer_than_max_cascade_is_400_before_any_call(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, count: int
) -> None:
    refs = [f"fc:openai/m{i}" for i in range(count)]
    answer = post_chat(gateway, {"model": refs, "messages": MESSAGES})
    assert answer.status == 400
    assert (answer.error["code"], answer.error["param"]) == ("invalid_request", "model")
    assert f"expands to {count} candidate models; at most 8" in answer.error["message"]
    assert "limits.max_cascade" in answer.error["message"]
    assert "X-Ringside-Models-Tried" not in answer.headers
    assert fake_openai.received == []


def test_max_cascade_bounds_expansions_and_slots_at_load(
    sidecar_factory: Callable[..., SidecarProcess], fake_openai: FakeOpenAI, tmp_path: Any
) -> None:
    config = cascade_config(fake_openai.url)
    config["limits"] = {"max_cascade": 2}
    config["slots"] = {"pair": ["fc:openai/cheap", "fc:openai/mid"]}
    gateway = sidecar_factory(config)

    within = post_chat(gateway, {"model": "slot:pair", "messages": MESSAGES})
    expanded = post_chat(gateway, {"model": "match:provider=openai,n=3", "messages": MESSAGES})
    mixed = post_chat(gateway, {"model": ["slot:pair", "fc:openai/big"], "messages": MESSAGES})

    assert within.status == 200
    for answer in (expanded, mixed):
        assert (
            answer.status == 400
            and "expands to 3 candidate models; at most 2" in (answer.error["message"])
        )
    config["slots"]["trio"] = ["fc:openai/cheap", "fc:openai/mid", "fc:openai/big"]
    path = tmp_path / "trio.yaml"
    path.write_text(yaml.safe_dump(config))
    checked = ringside("check-config", str(path), env={"TEST_OPENAI_KEY": "k"})
    assert checked.returncode != 0
    assert "slots.trio: lists 3 refs, more than limits.max_cascade (2)" in checked.stderr
