"""Admin `GET /openapi.yaml` (SPEC 2.6): the api listener as OpenAPI 3.1, kept true here.

The document is validated as OpenAPI 3.1 (openapi-spec-validator), its paths are exactly the api
listener's routes, and real answers of a running sidecar (success and error, JSON and SSE,
every endpoint) are checked against it: the status is one the operation declares, the body
matches that response's schema, the headers it requires are there and every declared header
that came matches its schema."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_document
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from sidecar.app import create_apps
from sidecar.appkeys import GatewayState
from sidecar.settings import load_settings
from tests.conftest import openai_config
from tests.procs import SidecarProcess
from tests.support import REPO_ROOT, Answer, module_sidecar, request, sse_events
from tests.upstreams.openai_fake import FakeOpenAI, Reply

DOCUMENT_PATH = REPO_ROOT / "sidecar" / "openapi.yaml"
DOCUMENT: dict[str, Any] = yaml.safe_load(DOCUMENT_PATH.read_text())
BASE_URI = "urn:ringside:openapi"
REGISTRY: Registry[Any] = Registry().with_resource(
    BASE_URI, Resource.from_contents(DOCUMENT, default_specification=DRAFT202012)
)
KEY = "sk-openapi-document-key"
LIMITED = "sk-openapi-limited-key"
TOKEN_SECRET = "a-client-token-secret-of-32-bytes-or-more"
MINI = "fc:openai/gpt-4o-mini"
EMBED = "fc:openai/text-embedding-3-small"
HELLO = [{"role": "user", "content": "hi"}]


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def pointer(*parts: str) -> str:
    return "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)


def schema_check(location: str, instance: Any) -> None:
    """Validate `instance` against the schema at `location` (a JSON pointer in the document),
    its $refs resolved in the document."""
    validator = OAS31Validator({"$ref": f"{BASE_URI}#/{location}"}, registry=REGISTRY)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    assert not errors, f"{location}: " + "; ".join(
        f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]
    )


def resolved(node: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A `$ref`'d component and its pointer (a response or a header), or the node itself."""
    ref = node.get("$ref")
    if ref is None:
        return node, ""
    parts = ref.removeprefix("#/").split("/")
    found: Any = DOCUMENT
    for part in parts:
        found = found[part.replace("~1", "/").replace("~0", "~")]
    return found, ref.removeprefix("#/")


def check_answer(path: str, method: str, answer: Answer) -> dict[str, Any]:
    """The answer conforms to the operation `method path`: returns the response object used."""
    operation = DOCUMENT["paths"][path][method]
    status = str(answer.status)
    key = status if status in operation["responses"] else "default"
    assert key in operation["responses"], f"{method} {path}: {status} is not declared"
    declared = operation["responses"][key]
    response, response_at = resolved(declared)
    if not response_at:
        response_at = pointer("paths", path, method, "responses", key)
    for name, header in response.get("headers", {}).items():
        header, header_at = resolved(header)
        header_at = header_at or f"{response_at}/headers/{pointer(name)}"
        value = answer.headers.get(name)
        if value is None:
            assert not header.get("required"), f"{method} {path} {status}: no {name} header"
            continue
        schema_check(f"{header_at}/schema", value)
    content = response.get("content")
    if content is None:
        assert answer.body == b"", f"{method} {path} {status}: a body where none is declared"
        return response
    media_type = (answer.headers.get("Content-Type") or "").partition(";")[0].strip()
    assert media_type in content, f"{method} {path} {status}: {media_type} is not declared"
    if media_type == "application/json":
        schema_check(f"{response_at}/content/{pointer(media_type)}/schema", json.loads(answer.body))
    return response


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    config = openai_config(
        _openai_server.url,
        keys=[
            {"id": "app1", "sha256": sha256(KEY), "developer": "alice"},
            {"id": "limited", "sha256": sha256(LIMITED), "rate_limit": {"rpm": 1}},
        ],
        slots={"chat": [MINI, "fc:openai/gpt-4o"]},
    )
    config["models"][EMBED] = {"input_per_mtok": 0.02, "output_per_mtok": 0, "caps": ["embeddings"]}
    config["providers"]["mock"] = {"kind": "mock"}  # the Responses API translated onto chat
    workdir = tmp_path_factory.mktemp("openapi-document")
    yield from module_sidecar(workdir, config, {"RINGSIDE_TOKEN_SECRET": TOKEN_SECRET})


def call(
    gateway: SidecarProcess,
    method: str,
    path: str,
    body: Any = None,
    key: str | None = KEY,
    headers: dict[str, str] | None = None,
) -> Answer:
    sent = {"Authorization": f"Bearer {key}"} if key else {}
    return request(gateway.url, method, path, body, {**sent, **(headers or {})})


def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"] == "3.1.0"
    validate_document(DOCUMENT)


def test_the_admin_listener_serves_the_document(gateway: SidecarProcess) -> None:
    with urllib.request.urlopen(gateway.admin_url + "/openapi.yaml", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/yaml"
        assert response.read() == DOCUMENT_PATH.read_bytes()


def test_the_documented_paths_are_exactly_the_routes_of_the_api_listener(tmp_path: Path) -> None:
    path = tmp_path / "ringside.yaml"
    path.write_text(yaml.safe_dump(openai_config("http://127.0.0.1:9/v1")))
    api, _admin = create_apps(GatewayState(str(path), load_settings(str(path))))
    served = set()
    for route in api.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        template = info.get("path") or info.get("formatter", "")
        if template == "/{path}":
            continue  # the catch-all: pass-through paths (configured) and the 404
        if route.method == "HEAD":
            continue  # aiohttp answers HEAD beside every GET: the GET's headers, no body
        served.add((template.replace("{ref:.+}", "{ref}"), route.method))
    documented = {
        (path_, method.upper())
        for path_, item in DOCUMENT["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert documented == served


def test_a_completion_and_its_headers(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    answer = call(gateway, "POST", "/v1/chat/completions", {"model": MINI, "messages": HELLO})
    assert answer.status == 200
    check_answer("/v1/chat/completions", "post", answer)
    assert answer.headers["X-Ringside-Model-Used"] == MINI


OPENAI_DOCUMENT: dict[str, Any] = yaml.safe_load(
    (REPO_ROOT / "tests" / "openapi" / "chat-completions.yaml").read_text()
)
OPENAI_URI = "urn:openai:openapi"
OPENAI_REGISTRY: Registry[Any] = Registry().with_resource(
    OPENAI_URI, Resource.from_contents(OPENAI_DOCUMENT, default_specification=DRAFT202012)
)


@pytest.mark.parametrize("model", [MINI, "fc:mock/echo"], ids=["openai-kind", "mock"])
def test_a_completion_is_also_openais_published_shape(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, model: str
) -> None:
    """What the document promises stays within what OpenAI's own document (the trimmed copy
    the fuzz test uses) describes, passed through or built by the sidecar. (Its stream chunk
    schema is not used: it declares finish_reason and usage non-null, and OpenAI sends null.)"""
    answer = call(gateway, "POST", "/v1/chat/completions", {"model": model, "messages": HELLO})
    assert answer.status == 200
    validator = OAS31Validator(
        {"$ref": f"{OPENAI_URI}#/components/schemas/CreateChatCompletionResponse"},
        registry=OPENAI_REGISTRY,
    )
    assert [error.message for error in validator.iter_errors(answer.json())] == []
    check_answer("/v1/chat/completions", "post", answer)


def test_a_stream_its_headers_and_every_chunk(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = call(
        gateway,
        "POST",
        "/v1/chat/completions",
        {"model": "slot:chat", "messages": HELLO, "stream": True,
         "stream_options": {"include_usage": True}},
    )  # fmt: skip
    assert answer.status == 200
    check_answer("/v1/chat/completions", "post", answer)
    events = sse_events(answer.body)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        schema_check("components/schemas/ChatCompletionChunk", json.loads(event))


@pytest.mark.parametrize(
    ("body", "key", "headers", "status", "code"),
    [
        (b"not json", KEY, {}, 400, "invalid_request"),
        ({"model": "gpt-4o", "messages": HELLO}, KEY, {}, 400, "invalid_model_ref"),
        ({"model": MINI, "messages": HELLO, "temperature": 9}, KEY, {}, 400, "invalid_request"),
        ({"model": MINI, "messages": HELLO}, None, {}, 401, "invalid_api_key"),
        ({"model": "fc:nobody/x", "messages": HELLO}, KEY, {}, 404, "model_not_found"),
        (
            {"model": MINI, "messages": HELLO},
            KEY,
            {"Content-Type": "text/plain"},
            415,
            "unsupported_media_type",
        ),
        (
            {"model": [MINI, "fc:openai/gpt-4o"], "messages": HELLO, "stream": True},
            KEY,
            {},
            400,
            "fallback_with_stream_unsupported",
        ),
    ],
    ids=["not-json", "bad-ref", "out-of-range", "no-key", "unknown-ref", "415", "array-stream"],
)
def test_a_refusal_is_the_documented_envelope(
    gateway: SidecarProcess,
    fake_openai: FakeOpenAI,
    body: Any,
    key: str | None,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    answer = call(gateway, "POST", "/v1/chat/completions", body, key, headers)
    assert answer.status == status, answer.body
    assert answer.error["code"] == code
    check_answer("/v1/chat/completions", "post", answer)


def test_a_rate_limited_caller_gets_the_documented_429(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    call(gateway, "POST", "/v1/chat/completions", {"model": MINI, "messages": HELLO}, LIMITED)
    answer = call(
        gateway, "POST", "/v1/chat/completions", {"model": MINI, "messages": HELLO}, LIMITED
    )
    assert answer.status == 429
    response = check_answer("/v1/chat/completions", "post", answer)
    for name in ("Retry-After", "retry-after-ms", "X-Ringside-RateLimit-Scope"):
        assert name in response["headers"] and name in answer.headers


def test_upstream_failures_are_the_documented_503_and_passed_through_400(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(status=500))
    answer = call(gateway, "POST", "/v1/chat/completions", {"model": MINI, "messages": HELLO})
    assert (answer.status, answer.error["code"]) == (503, "upstream_unavailable")
    check_answer("/v1/chat/completions", "post", answer)
    fake_openai.script(
        Reply(status=400, error_code="invalid_value", error_type="invalid_request_error")
    )
    answer = call(gateway, "POST", "/v1/chat/completions", {"model": MINI, "messages": HELLO})
    assert (answer.status, answer.error["code"]) == (400, "invalid_value")
    check_answer("/v1/chat/completions", "post", answer)


def test_embeddings_float_and_base64(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    for encoding in ("float", "base64"):
        answer = call(
            gateway,
            "POST",
            "/v1/embeddings",
            {"model": EMBED, "input": ["one", "two"], "encoding_format": encoding},
        )
        assert answer.status == 200, answer.body
        check_answer("/v1/embeddings", "post", answer)
    answer = call(gateway, "POST", "/v1/embeddings", {"model": EMBED})
    assert answer.status == 400
    check_answer("/v1/embeddings", "post", answer)


def test_the_model_list_and_its_entries(gateway: SidecarProcess) -> None:
    answer = call(gateway, "GET", "/v1/models")
    assert answer.status == 200
    check_answer("/v1/models", "get", answer)
    ids = [entry["id"] for entry in answer.json()["data"]]
    assert MINI in ids and "slot:chat" in ids
    for ref in (MINI, "slot:chat", "fc:openai%2Fgpt-4o"):
        answer = call(gateway, "GET", f"/v1/models/{ref}")
        assert answer.status == 200, ref
        check_answer("/v1/models/{ref}", "get", answer)
    answer = call(gateway, "GET", "/v1/models/fc:openai/unknown")
    assert (answer.status, answer.error["code"]) == (404, "model_not_found")
    check_answer("/v1/models/{ref}", "get", answer)
    answer = call(gateway, "GET", "/v1/models", key=None)
    assert answer.status == 401
    check_answer("/v1/models", "get", answer)


def test_a_client_token_and_its_refusals(gateway: SidecarProcess) -> None:
    answer = call(
        gateway,
        "POST",
        "/v1/client_tokens",
        {"customer": "cust_1", "allowed_models": ["slot:chat"], "ttl_seconds": 60},
    )
    assert answer.status == 200, answer.body
    check_answer("/v1/client_tokens", "post", answer)
    token = answer.json()["token"]
    answer = call(gateway, "POST", "/v1/client_tokens", {"customer": "c", "orign": "x"})
    assert answer.status == 400
    check_answer("/v1/client_tokens", "post", answer)
    answer = call(gateway, "POST", "/v1/client_tokens", {"customer": "c"}, key=token)
    assert answer.status == 401
    check_answer("/v1/client_tokens", "post", answer)


def test_a_preflight(gateway: SidecarProcess) -> None:
    answer = request(
        gateway.url,
        "OPTIONS",
        "/v1/chat/completions",
        headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"},
    )
    assert answer.status == 204
    check_answer("/v1/chat/completions", "options", answer)


def test_a_response_and_its_stream_events(gateway: SidecarProcess) -> None:
    body = {"model": "fc:mock/echo", "input": "hi", "instructions": "be brief"}
    answer = call(gateway, "POST", "/v1/responses", body)
    assert answer.status == 200, answer.body
    check_answer("/v1/responses", "post", answer)
    answer = call(gateway, "POST", "/v1/responses", {**body, "stream": True})
    assert answer.status == 200, answer.body
    check_answer("/v1/responses", "post", answer)
    events = [json.loads(event) for event in sse_events(answer.body)]
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    for event in events:
        schema_check("components/schemas/ResponseStreamEvent", event)
    schema_check("components/schemas/Response", events[-1]["response"])
    answer = call(gateway, "POST", "/v1/responses", {**body, "previous_response_id": "resp_1"})
    assert answer.status == 400
    check_answer("/v1/responses", "post", answer)
