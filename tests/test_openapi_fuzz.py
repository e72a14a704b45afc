"""Fuzzing POST /v1/chat/completions with OpenAI's own OpenAPI description (schemathesis).

Requests are generated from `tests/openapi/chat-completions.yaml` (OpenAI's published document,
trimmed to this operation) and sent to a real sidecar whose models are served in-process by the
mock provider (no network). Whatever is sent, the answer stays in the contract: no 5xx but a 503
`upstream_unavailable` / `store_unavailable`; every error exactly the OpenAI envelope; every 200
valid per the document's response schemas (a stream: every chunk) and parsed by the OpenAI SDK.

Two runs. Requests valid and invalid, mostly with `model` set to a ref the config serves, so
that they reach routing, budgets, the mock and the answer (a generated `model` is rarely a
ref: a 400 once the rest passed validation); and valid requests only, to a served ref, which
reach streams, cascades and structured output.

Bounded for CI: each run sends schemathesis' boundary cases (about a thousand, cheap to make),
then RINGSIDE_FUZZ_EXAMPLES generated requests (default 110; making them is the slow part),
derandomized: the same requests every run, so CI is stable. RINGSIDE_FUZZ_RANDOM=1 draws new
ones; with more examples, a deeper hunt.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from hypothesis import HealthCheck, settings
from jsonschema import Draft202012Validator
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.procs import SidecarProcess
from tests.support import module_sidecar, sse_events

schemathesis = pytest.importorskip(
    "schemathesis",
    reason="pip install --no-deps 'schemathesis==4.32.5' (.ci/run does; see setup.cfg [test])",
)

SPEC_PATH = Path(__file__).parent / "openapi" / "chat-completions.yaml"
RETRYABLE_5XX = {"upstream_unavailable", "store_unavailable"}
CUSTOMER = "fuzz"
SERVED_REFS = ("fc:mock/echo", "slot:pair", "match:caps=tools", "fc:down/flaky")

CONFIG: dict[str, Any] = {
    "storage": {"backend": "memory"},
    "providers": {
        "mock": {"kind": "mock", "mock": {"default": {"chunks": 2}}},
        "down": {
            "kind": "mock",
            "mock": {"default": {"fail_status": 503}},
            "circuit": {"failures": 1_000_000, "cooldown": 0.001},
        },
    },
    "models": {
        "fc:mock/echo": {
            "input_per_mtok": 0.15,
            "output_per_mtok": 0.60,
            "context": 128000,
            "max_output": 16384,
            "caps": ["tools", "json_schema", "vision"],
        },
        "fc:down/flaky": {"input_per_mtok": 0.10, "output_per_mtok": 0.40, "context": 128000},
    },
    "slots": {"pair": ["fc:down/flaky", "fc:mock/echo"]},  # a cascade that falls back
    "customers": {CUSTOMER: {"budget": {"usd": 1_000_000, "period": "total"}}},
    "rate_limits": {"ip": {"rpm": 1_000_000, "tpm": 1_000_000_000_000}},
}


def _schema(mode: str) -> Any:
    config = schemathesis.Config.from_dict(
        {"generation": {"mode": mode}, "output": {"sanitization": {"enabled": False}}}
    )
    return schemathesis.openapi.from_path(SPEC_PATH, config=config).include(
        method="POST", path="/chat/completions"
    )


ANY_BODY = _schema("all")  # valid and invalid requests
VALID_BODY = _schema("positive")
FUZZ = settings(
    max_examples=int(os.environ.get("RINGSIDE_FUZZ_EXAMPLES", "110")),
    derandomize=os.environ.get("RINGSIDE_FUZZ_RANDOM") != "1",
    deadline=None,
    database=None,  # nothing written into the work tree
    suppress_health_check=list(HealthCheck),
)


def _json_schema(node: Any) -> Any:
    """The document's schemas as JSON Schema: OpenAPI 3.0's `nullable: true`, which the
    document still uses in places, becomes `anyOf [..., null]`."""
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: _json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


def _validator(name: str) -> Draft202012Validator:
    document = _json_schema(yaml.safe_load(SPEC_PATH.read_text()))
    resource = Resource.from_contents(document, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource("urn:openai-chat", resource)
    return Draft202012Validator(
        {"$ref": f"urn:openai-chat#/components/schemas/{name}"}, registry=registry
    )


RESPONSE = _validator("CreateChatCompletionResponse")
STREAM_CHUNK = _validator("CreateChatCompletionStreamResponse")


@pytest.fixture(scope="module")
def fuzz_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    yield from module_sidecar(tmp_path_factory.mktemp("fuzz"), CONFIG)


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as kept_alive:
        yield kept_alive


def send(case: schemathesis.Case, proc: SidecarProcess, session: requests.Session) -> None:
    headers = {"FC-Customer": CUSTOMER}
    response = case.call(base_url=proc.base_url, session=session, headers=headers, timeout=10)
    check_answer(response, case, proc)


def check_answer(response: Any, case: schemathesis.Case, proc: SidecarProcess) -> None:
    status = response.status_code
    sent = f"{status} {response.content[:600]!r}\nfor {case.as_curl_command()}"
    if status >= 400:
        data = response.json()
        assert set(data) == {"error"}, sent
        error = data["error"]
        assert set(error) == {"message", "type", "param", "code"}, sent
        assert isinstance(error["message"], str) and error["message"], sent
        assert isinstance(error["type"], str) and error["type"], sent
        assert error["param"] is None or isinstance(error["param"], str), sent
        assert error["code"] is None or isinstance(error["code"], str), sent
        if status >= 500:
            assert status == 503 and error["code"] in RETRYABLE_5XX, (
                f"{sent}\nsidecar log:\n{proc.stderr()[-4000:]}"
            )
        return
    if case.method != "POST":  # schemathesis tries other methods: OPTIONS is CORS' preflight
        return
    assert status == 200, sent
    content_type = response.headers.get("content-type", [""])[0]
    if content_type.startswith("text/event-stream"):
        events = sse_events(response.content)
        assert events and events[-1] == "[DONE]", f"{sent}\n{events[-3:]}"
        for event in events[:-1]:
            chunk = json.loads(event)
            errors = [error.message for error in STREAM_CHUNK.iter_errors(chunk)]
            assert not errors, f"{sent}\n{chunk}\n{errors}"
            ChatCompletionChunk.model_validate(chunk)
        return
    assert content_type == "application/json", f"{sent}\n{response.headers}"
    body = response.json()
    errors = [error.message for error in RESPONSE.iter_errors(body)]
    assert not errors, f"{sent}\n{body}\n{errors}"
    ChatCompletion.model_validate(body)


def pick(case: schemathesis.Case, options: tuple[Any, ...], salt: str = "") -> Any:
    """One of `options`, chosen by the request itself: the same request, the same choice (a
    hypothesis draw would skip schemathesis' boundary cases, which come without draws)."""
    return options[zlib.crc32((salt + repr(case.body)).encode()) % len(options)]


@ANY_BODY.parametrize()
@FUZZ
def test_generated_requests_get_an_answer_in_the_contract(
    case: schemathesis.Case, fuzz_sidecar: SidecarProcess, session: requests.Session
) -> None:
    ref = pick(case, (None, *SERVED_REFS))  # None: the generated model, rarely a ref
    if ref is not None and isinstance(case.body, dict):
        case.body["model"] = ref
    send(case, fuzz_sidecar, session)


@VALID_BODY.parametrize()
@FUZZ
def test_valid_requests_to_a_served_ref_get_an_answer_in_the_contract(
    case: schemathesis.Case, fuzz_sidecar: SidecarProcess, session: requests.Session
) -> None:
    assert isinstance(case.body, dict)
    case.body["model"] = pick(case, SERVED_REFS)
    if pick(case, (False, True), "stream"):  # generated requests seldom ask for a stream
        case.body["stream"] = True
    send(case, fuzz_sidecar, session)
