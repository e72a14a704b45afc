"""Errors of SPEC 3 that the foundation reaches: status, code, `param`, the OpenAI envelope and
the headers, for malformed input (raw HTTP) and for upstream failures."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import openai_config
from tests.procs import SidecarProcess
from tests.support import HELLO, module_sidecar, post_chat, request, sdk, without_circuit_breakers
from tests.upstreams.openai_fake import FakeOpenAI, Reply

MINI = "fc:openai/gpt-4o-mini"
MAX_BODY = 4096


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    config = openai_config(
        _openai_server.url,
        limits={"max_body_bytes": MAX_BODY},
        slots={"chat": [MINI, "fc:openai/gpt-4o"]},
    )
    config["providers"]["hasty"] = {
        "kind": "openai",
        "base_url": _openai_server.url,
        "api_key_env": "TEST_OPENAI_KEY",
        "timeout": {"connect": 1, "read": 0.3},
    }
    yield from module_sidecar(tmp_path_factory.mktemp("errors"), without_circuit_breakers(config))


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MINI, "messages": HELLO, **fields}


# -- malformed requests: 400 invalid_request -------------------------------------------------


def test_body_that_is_not_json_is_400(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    answer = post_chat(gateway, b'{"model": "fc:openai/gpt-4o-mini", ')
    assert answer.status == 400
    assert answer.error["code"] == "invalid_request"
    assert answer.error["type"] == "invalid_request_error"
    assert "not valid JSON" in answer.error["message"]
    assert fake_openai.received == []


def test_empty_body_is_400(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    answer = post_chat(gateway, b"")
    assert answer.status == 400
    assert answer.error["code"] == "invalid_request"


def test_body_that_is_not_an_object_is_400(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(gateway, [chat()])
    assert answer.status == 400
    assert answer.error["code"] == "invalid_request"
    assert "JSON object" in answer.error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HELLO}, "model"),
        ({"model": MINI}, "messages"),
        (chat(messages=[]), "messages"),
        (chat(messages="hi"), "messages"),
        (chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
        (chat(messages=[{"role": "user"}]), "messages[0].content"),
        (chat(messages=[HELLO[0], {"role": "user", "content": 5}]), "messages[1].content"),
        (chat(messages=[HELLO[0], {"role": "tool", "content": "42"}]), "messages[1].tool_call_id"),
        (
            chat(messages=[{"role": "user", "content": [{"text": "no type"}]}]),
            "messages[0].content[0]",
        ),
        (chat(temperature=2.5), "temperature"),
        (chat(temperature="hot"), "temperature"),
        (chat(top_p=1.5), "top_p"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_completion_tokens=1.5), "max_completion_tokens"),
        (chat(n=0), "n"),
        (chat(stream="yes"), "stream"),
        (chat(stream_options=True), "stream_options"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat(tools={"type": "function"}), "tools"),
        (chat(response_format={"type": "yaml"}), "response_format"),
        (chat(user=42), "user"),
        (chat(model=42), "model"),
        (chat(model=[]), "model"),
    ],
)
def test_invalid_parameter_is_400_naming_it(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, body: dict[str, Any], param: str
) -> None:
    answer = post_chat(gateway, body)
    assert answer.status == 400
    assert answer.error["code"] == "invalid_request"
    assert answer.error["param"] == param
    assert fake_openai.received == []


def test_sdk_sees_a_bad_parameter_as_bad_request(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gateway).chat.completions.create(model=MINI, messages=HELLO, temperature=7)
    assert caught.value.status_code == 400
    assert caught.value.code == "invalid_request"
    assert caught.value.param == "temperature"


def test_body_over_max_body_bytes_is_413(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    big = chat(messages=[{"role": "user", "content": "x" * MAX_BODY}])
    answer = post_chat(gateway, big)
    assert answer.status == 413
    assert answer.error["code"] == "request_too_large"
    assert str(MAX_BODY) in answer.error["message"]
    assert fake_openai.received == []


def test_body_just_under_max_body_bytes_is_accepted(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    body = chat(messages=[{"role": "user", "content": "x" * (MAX_BODY - 200)}])
    assert post_chat(gateway, body).status == 200


def test_bad_fc_customer_is_400(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    answer = post_chat(gateway, chat(), {"FC-Customer": "acme corp/eu"})
    assert answer.status == 400
    assert answer.error["code"] == "invalid_request"
    assert answer.error["param"] == "FC-Customer"


def test_overlong_fc_customer_is_400(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    answer = post_chat(gateway, chat(), {"FC-Customer": "c" * 129})
    assert answer.status == 400
    assert answer.error["param"] == "FC-Customer"


def test_bad_idempotency_key_is_400(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    answer = post_chat(gateway, chat(), {"Idempotency-Key": "k" * 256})
    assert answer.status == 400
    assert answer.error["code"] == "invalid_request"
    assert answer.error["param"] == "Idempotency-Key"
    assert fake_openai.received == []


# -- model refs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref", ["fc:openai", "fc:/gpt-4o", "fc:openai/", "FC:openai/gpt-4o", "slot:", "match:"]
)
def test_malformed_fc_ref_is_invalid_model_ref(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, ref: str
) -> None:
    answer = post_chat(gateway, chat(model=ref))
    assert answer.status == 400
    assert answer.error["code"] == "invalid_model_ref"


def test_bare_model_name_is_invalid_model_ref(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(gateway, chat(model="gpt-4o"))
    assert answer.status == 400
    assert answer.error["code"] == "invalid_model_ref"
    assert answer.error["param"] == "model"
    assert "fc:" in answer.error["message"]


@pytest.mark.parametrize(
    "ref",
    ["fc:nowhere/gpt-4o", "slot:nonexistent", "match:caps=vision,ctx>=999999999", "match:tag=nope"],
)
def test_unknown_provider_slot_or_unmatched_match_is_404(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, ref: str
) -> None:
    answer = post_chat(gateway, chat(model=ref))
    assert answer.status == 404
    assert answer.error["code"] == "model_not_found"
    assert answer.error["param"] == "model"


def test_sdk_sees_an_unknown_model_as_not_found(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(gateway).chat.completions.create(model="slot:nonexistent", messages=HELLO)
    assert caught.value.code == "model_not_found"


def test_cascade_with_stream_is_400(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    answer = post_chat(gateway, chat(model=["fc:openai/gpt-4o-mini", "slot:chat"], stream=True))
    assert answer.status == 400
    assert answer.error["code"] == "fallback_with_stream_unsupported"


def test_cascade_with_idempotency_key_is_400(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(
        gateway, chat(model=[MINI, "fc:openai/gpt-4o"]), {"Idempotency-Key": "order-7"}
    )
    assert answer.status == 400
    assert answer.error["code"] == "fallback_with_idempotency_unsupported"
    assert fake_openai.received == []


# -- upstream failures -----------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
def test_upstream_server_failure_is_503_upstream_unavailable(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, status: int
) -> None:
    fake_openai.script(Reply(status=status, error_message="provider trouble"))
    answer = post_chat(gateway, chat())
    assert answer.status == 503
    assert answer.error["code"] == "upstream_unavailable"
    assert "provider trouble" in answer.error["message"]


def test_provider_key_rejected_upstream_is_503_not_401(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(status=401, error_code="invalid_api_key", error_message="bad key"))
    answer = post_chat(gateway, chat())
    assert answer.status == 503
    assert answer.error["code"] == "upstream_unavailable"


def test_upstream_connection_reset_is_503(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Reply(reset=True))
    answer = post_chat(gateway, chat())
    assert answer.status == 503
    assert answer.error["code"] == "upstream_unavailable"


def test_upstream_timeout_is_503(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Reply(delay=1.5))
    answer = post_chat(gateway, chat(model="fc:hasty/gpt-4o-mini"))
    assert answer.status == 503
    assert answer.error["code"] == "upstream_unavailable"
    assert "timed out" in answer.error["message"]


def test_unparseable_upstream_body_is_503(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Reply(raw_body=b"<html>bad gateway</html>"))
    answer = post_chat(gateway, chat())
    assert answer.status == 503
    assert answer.error["code"] == "upstream_unavailable"


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "invalid_value"), (404, "model_not_found"), (422, None)],
)
def test_upstream_client_fault_passes_through_with_status_and_message(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, status: int, code: str | None
) -> None:
    fake_openai.script(
        Reply(
            status=status,
            error_code=code,
            error_type="invalid_request_error",
            error_message="Invalid value for 'logprobs': expected a boolean.",
        )
    )
    answer = post_chat(gateway, chat())
    assert answer.status == status
    assert answer.error["message"] == "Invalid value for 'logprobs': expected a boolean."
    assert answer.error["type"] == "invalid_request_error"
    if code is not None:
        assert answer.error["code"] == code
    assert len(fake_openai.received) == 1


def test_upstream_client_fault_in_a_cascade_does_not_escalate(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(status=400, error_code="invalid_value", error_message="nope"))
    answer = post_chat(gateway, chat(model="slot:chat"))
    assert answer.status == 400
    assert fake_openai.models_called() == ["gpt-4o-mini"]


# -- headers on errors -----------------------------------------------------------------------


def test_error_before_routing_has_request_id_but_no_model_headers(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(gateway, b"not json", {"X-Request-Id": "err-early-1"})
    assert answer.headers["X-Request-Id"] == "err-early-1"
    assert answer.headers["X-Ringside-Models-Tried"] is None
    assert answer.headers["X-Ringside-Model-Used"] is None


def test_generated_request_id_is_on_error_responses(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(gateway, chat(model="gpt-4o"))
    assert answer.headers["X-Request-Id"]


def test_upstream_failure_carries_models_tried_and_no_model_used(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(status=500), Reply(status=500))
    answer = post_chat(gateway, chat(model="slot:chat"), {"X-Request-Id": "err-late-1"})
    assert answer.status == 503
    assert answer.headers["X-Request-Id"] == "err-late-1"
    assert answer.headers["X-Ringside-Models-Tried"] == f"{MINI},fc:openai/gpt-4o"
    assert answer.headers["X-Ringside-Fallback-Triggered"] == "true"
    assert answer.headers["X-Ringside-Model-Used"] is None


def test_sdk_raw_response_of_an_error_has_the_headers(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(status=503))
    with pytest.raises(openai.InternalServerError) as caught:
        sdk(gateway).chat.completions.create(
            model=MINI, messages=HELLO, extra_headers={"X-Request-Id": "sdk-err-1"}
        )
    assert caught.value.status_code == 503
    assert caught.value.response.headers["X-Request-Id"] == "sdk-err-1"
    assert caught.value.response.headers["X-Ringside-Models-Tried"] == MINI


def test_unknown_path_is_404_in_the_openai_envelope(gateway: SidecarProcess) -> None:
    answer = request(gateway.url, "POST", "/v1/fine_tuning/jobs", {"training_file": "x"})
    assert answer.status == 404
    assert answer.error["code"] == "not_found"
    assert "/v1/fine_tuning/jobs" in answer.error["message"]
    assert "POST /v1/embeddings" in answer.error["message"]  # what is served
    assert answer.headers["X-Request-Id"]


@pytest.mark.parametrize("path", ["/v1/x%0ay", "/v1/%0d%0aSet-Cookie:%20a=b", "/%00"])
def test_a_path_with_control_characters_is_the_same_404_envelope(
    gateway: SidecarProcess, path: str
) -> None:
    """Encoded CR, LF and NUL decode into the path: aiohttp's router would answer its own
    text/plain 404 for a path a `.` pattern cannot match; the catch-all takes any path."""
    answer = request(gateway.url, "POST", path, {})
    assert answer.status == 404
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.error["code"] == "not_found"
    assert "Set-Cookie" not in answer.headers


def test_wrong_method_is_405_naming_the_right_one(gateway: SidecarProcess) -> None:
    answer = request(gateway.url, "GET", "/v1/chat/completions")
    assert answer.status == 405
    assert answer.error["code"] == "method_not_allowed"
    assert answer.headers["Allow"] == "POST, OPTIONS"
