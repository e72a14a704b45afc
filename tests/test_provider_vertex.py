"""The `vertex` kind: the gemini kind's bodies on Vertex AI, with Google application default
credentials.

In process: Vertex's URLs, the settings a vertex provider needs, and `GoogleToken` (the access
token kept fresh in the background, off the request path), with fake credentials and with
google-auth itself reading a service-account key file whose token_uri is a fake token endpoint
(tests/upstreams/google_token_fake.py). End to end: a sidecar process whose
GOOGLE_APPLICATION_CREDENTIALS names such a key file, in front of the fake Gemini server in its
Vertex mode (tests/upstreams/gemini_fake.py), which takes only tokens the endpoint issued; and
one with no key file, whose tokens come from a fake metadata server (as on GKE).
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from sidecar.errors import Outcome, UpstreamError
from sidecar.providers import ADAPTERS, provider_problems, vertex
from sidecar.providers.base import HttpRequest, UpstreamCall
from sidecar.providers.vertex import VertexAdapter
from sidecar.providers.vertex_auth import GoogleToken
from sidecar.settings.model import ProviderSettings
from tests.procs import SidecarProcess
from tests.support import (
    module_sidecar,
    post_chat,
    ringside,
    sdk,
    sse_events,
    start_sidecar,
    without_circuit_breakers,
)
from tests.test_proxies import ConnectProxy
from tests.upstreams.gemini_fake import Call, FakeGemini, Reply, request_problems
from tests.upstreams.google_token_fake import (
    FakeMetadataServer,
    FakeTokenEndpoint,
    service_account_file,
)
from tests.upstreams.openai_fake import FakeOpenAI

PROJECT, LOCATION = "test-project", "europe-west4"
FLASH = "fc:vertex/gemini-2.5-flash"
MINI = "fc:openai/gpt-4o-mini"
HELLO = [{"role": "user", "content": "hi"}]


# -- in process: URLs and settings ----------------------------------------------------------------
def settings(**given: Any) -> ProviderSettings:
    fields: dict[str, Any] = {
        "name": "vertex", "kind": "vertex", "base_url": None, "api_key_env": None,
        "project": PROJECT, "location": LOCATION, **given,
    }  # fmt: skip
    return ProviderSettings(**fields)


def build(body: dict[str, Any], *, stream: bool = False, model: str = "gemini-2.5-flash",
          **given: Any) -> HttpRequest:  # fmt: skip
    call = UpstreamCall(settings(**given), model, {"model": FLASH, **body}, stream)
    return VertexAdapter(settings(**given)).build_request(call)


def test_the_kind_is_registered_with_the_gemini_capabilities() -> None:
    built = ADAPTERS["vertex"](settings())
    assert isinstance(built, VertexAdapter)
    assert built.caps.names() == {
        "tools", "vision", "json_schema", "json_object", "usage_in_stream", "n", "embeddings",
    }  # fmt: skip


def test_requests_go_to_the_regional_publisher_model_url_without_a_credential() -> None:
    request = build({"messages": HELLO})
    assert request.url == (
        "https://europe-west4-aiplatform.googleapis.com/v1/projects/test-project/locations/"
        "europe-west4/publishers/google/models/gemini-2.5-flash:generateContent"
    )
    assert "Authorization" not in request.headers and "x-goog-api-key" not in request.headers
    streamed = build({"messages": HELLO}, stream=True)
    assert streamed.url.endswith("/models/gemini-2.5-flash:streamGenerateContent?alt=sse")


def test_the_global_location_is_the_default_and_base_url_and_api_version_override() -> None:
    assert build({"messages": HELLO}, location=None).url.startswith(
        "https://aiplatform.googleapis.com/v1/projects/test-project/locations/global/"
    )
    own = build({"messages": HELLO}, base_url="http://127.0.0.1:9/", api_version="v1beta1")
    assert own.url.startswith("http://127.0.0.1:9/v1beta1/projects/test-project/locations/")
    endpoint = build({"messages": HELLO}, model="endpoints/1234")
    assert endpoint.url.endswith("/locations/europe-west4/endpoints/1234:generateContent")


def test_the_body_is_the_gemini_kinds() -> None:
    body = {"messages": [{"role": "system", "content": "Be brief."}, *HELLO], "n": 2}
    raw = build(body).body
    assert request_problems(raw) == []
    sent = orjson.loads(raw)
    assert sent["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert sent["generationConfig"] == {"candidateCount": 2}


def test_settings_problems_name_the_project_an_api_key_and_the_api_version() -> None:
    assert provider_problems(settings()) == []
    assert "project" in provider_problems(settings(project=None))[0][1]
    keyed = provider_problems(settings(api_key_env="GEMINI_API_KEY"))
    assert [key for key, _ in keyed] == ["api_key_env"] and "kind gemini" in keyed[0][1]
    assert [key for key, _ in provider_problems(settings(api_version="v2"))] == ["api_version"]


def test_without_google_auth_the_config_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(vertex, "has_google_auth", lambda: False)
    (problem,) = provider_problems(settings())
    assert "pip install 'ringside[vertex]'" in problem[1]


def test_check_config_accepts_the_kind_and_refuses_it_without_a_project(tmp_path: Path) -> None:
    path = tmp_path / "ringside.yaml"
    model = f"models:\n  {FLASH}: {{input_per_mtok: 0.3, output_per_mtok: 2.5}}\n"
    head = "storage: {backend: memory}\nproviders:\n"
    path.write_text(
        head + f"  vertex: {{kind: vertex, project: p1, location: {LOCATION}}}\n" + model
    )
    result = ringside("check-config", str(path))
    assert result.returncode == 0, result.stderr
    path.write_text(head + "  vertex: {kind: vertex}\n" + model)
    result = ringside("check-config", str(path))
    assert result.returncode != 0 and "vertex needs project" in result.stderr


# -- in process: GoogleToken ----------------------------------------------------------------------
class FakeCredentials:
    """What GoogleToken uses of google-auth's credentials: refresh(request), token, expiry."""

    def __init__(self, lifetimes: list[float], fail: int = 0) -> None:
        self.lifetimes = lifetimes
        self.fail = fail  # this many refreshes fail first
        self.refreshes = 0
        self.token: str | None = None
        self.expiry: datetime | None = None

    def refresh(self, request: Any) -> None:
        self.refreshes += 1
        if self.fail:
            self.fail -= 1
            raise OSError("metadata server unreachable")
        time.sleep(0.05)  # blocking I/O, as google-auth's: in a worker thread
        lifetime = self.lifetimes[min(self.refreshes, len(self.lifetimes)) - 1]
        self.token = f"token-{self.refreshes}"
        self.expiry = datetime.fromtimestamp(time.time() + lifetime, UTC).replace(tzinfo=None)


def holder(credentials: FakeCredentials, refresh_before: float = 300.0) -> GoogleToken:
    return GoogleToken(
        "vertex", lambda: credentials, lambda: object, refresh_before=refresh_before,
        min_wait=0.1,
    )  # fmt: skip


REQUEST = HttpRequest("https://example.com/", {"Content-Type": "application/json"}, b"{}")


async def test_the_first_call_waits_for_the_first_token_and_later_ones_do_not() -> None:
    credentials = FakeCredentials([3600])
    token = holder(credentials)  # built in the loop: the first fetch starts at once
    signed = await token(REQUEST)
    assert signed.headers["Authorization"] == "Bearer token-1"
    assert signed.headers["Content-Type"] == "application/json" and signed.url == REQUEST.url
    assert "Authorization" not in REQUEST.headers
    started = time.perf_counter()
    for _ in range(100):
        await token(REQUEST)
    assert time.perf_counter() - started < 0.5 and credentials.refreshes == 1  # no waiting


async def test_a_token_near_expiry_is_refreshed_in_the_background() -> None:
    credentials = FakeCredentials([300.3, 3600])  # 0.3 s before the refresh point
    token = holder(credentials)
    assert (await token(REQUEST)).headers["Authorization"] == "Bearer token-1"
    for _ in range(100):  # no call in between: the background task refreshes
        await asyncio.sleep(0.02)
        if credentials.refreshes == 2 and token.token == "token-2":
            break
    assert token.token == "token-2" and token.fetches == 2
    assert (await token(REQUEST)).headers["Authorization"] == "Bearer token-2"


async def test_a_failed_refresh_keeps_the_held_token_and_is_retried() -> None:
    credentials = FakeCredentials([300.2, 3600])
    token = holder(credentials)
    await token(REQUEST)
    credentials.fail = 1
    for _ in range(200):
        await asyncio.sleep(0.02)
        if token.token == "token-3":
            break
    assert credentials.refreshes == 3 and token.token == "token-3"  # one failure, retried


async def test_without_any_token_a_call_fails_as_the_provider_unavailable() -> None:
    token = holder(FakeCredentials([3600], fail=5))
    with pytest.raises(UpstreamError) as caught:
        await token(REQUEST)
    error = caught.value
    assert error.outcome is Outcome.UNAVAILABLE and error.reason == "credentials"
    assert "metadata server unreachable" in error.message and "'vertex'" in error.message


async def test_the_background_task_ends_with_its_provider_client() -> None:
    token = holder(FakeCredentials([3600]))
    await token(REQUEST)
    keeper = token._keeper
    assert keeper is not None and not keeper.done()
    del token
    gc.collect()
    await asyncio.sleep(0)
    assert keeper.cancelled() or keeper.done()


def test_built_outside_a_loop_it_starts_with_the_first_call() -> None:
    credentials = FakeCredentials([3600])
    token = holder(credentials)
    assert credentials.refreshes == 0

    async def first() -> str:
        return (await token(REQUEST)).headers["Authorization"]

    assert asyncio.run(first()) == "Bearer token-1"


# -- google-auth itself, with a key file whose token_uri is the fake endpoint ------------------
@pytest.fixture(scope="module")
def tokens() -> set[str]:
    return set()


@pytest.fixture(scope="module")
def endpoint(tokens: set[str]) -> Iterator[FakeTokenEndpoint]:
    fake = FakeTokenEndpoint(tokens)
    fake.server.start()
    yield fake
    fake.server.stop()


@pytest.fixture(scope="module")
def key_file(endpoint: FakeTokenEndpoint, tmp_path_factory: Any) -> Path:
    return service_account_file(tmp_path_factory.mktemp("google"), endpoint)


async def test_google_auth_fetches_the_token_from_the_key_files_token_uri(
    endpoint: FakeTokenEndpoint, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    before = len(endpoint.requests)
    token = GoogleToken("vertex")
    signed = await token(REQUEST)
    assert len(endpoint.requests) == before + 1 and endpoint.problems() == []
    assert signed.headers["Authorization"] == f"Bearer {endpoint.issued[-1]}"
    assert token.expiry is not None and 3500 < token.expiry - time.time() <= 3600


# -- end to end: a sidecar in front of the fake Vertex AI -----------------------------------------
@pytest.fixture(scope="module")
def fake_vertex(tokens: set[str]) -> Iterator[FakeGemini]:
    fake = FakeGemini(vertex=(PROJECT, LOCATION), tokens=tokens)
    fake.server.start()
    yield fake
    fake.server.stop()


@pytest.fixture
def google(fake_vertex: FakeGemini, endpoint: FakeTokenEndpoint) -> Iterator[FakeGemini]:
    fake_vertex.reset()
    yield fake_vertex
    assert fake_vertex.problems() == []  # every request was one Vertex AI takes
    assert endpoint.problems() == []


@pytest.fixture(scope="module")
def proc(
    fake_vertex: FakeGemini,
    endpoint: FakeTokenEndpoint,
    key_file: Path,
    _openai_server: FakeOpenAI,
    tmp_path_factory: Any,
) -> Iterator[SidecarProcess]:
    endpoint.script_lifetimes(302)  # the first token is due for refresh 2 s after it comes
    config = without_circuit_breakers(
        {
            "storage": {"backend": "memory"},
            "providers": {
                "vertex": {"kind": "vertex", "base_url": fake_vertex.url, "project": PROJECT,
                           "location": LOCATION, "timeout": {"connect": 2, "read": 5}},
                "openai": {"kind": "openai", "base_url": _openai_server.url,
                           "api_key_env": "TEST_OPENAI_KEY", "timeout": {"connect": 2, "read": 5}},
            },
            "models": {
                FLASH: {"input_per_mtok": 0.30, "output_per_mtok": 2.50, "context": 1048576},
                MINI: {"input_per_mtok": 0.15, "output_per_mtok": 0.60, "context": 128000},
            },
        }
    )  # fmt: skip
    env = {"GOOGLE_APPLICATION_CREDENTIALS": str(key_file), "NO_PROXY": "127.0.0.1,localhost"}
    yield from module_sidecar(tmp_path_factory.mktemp("vertex"), config, env)


def bearer(received: Any) -> str:
    return str(received.headers.get("Authorization", "")).removeprefix("Bearer ")


def test_chat_reaches_vertex_with_the_access_token_the_endpoint_issued(
    proc: SidecarProcess, google: FakeGemini, endpoint: FakeTokenEndpoint
) -> None:
    google.script(Reply(text="Bonjour!"))
    answer = sdk(proc).chat.completions.with_raw_response.create(model=FLASH, messages=HELLO)  # type: ignore[arg-type]
    completion = ChatCompletion.model_validate(json.loads(answer.content))
    assert completion.choices[0].message.content == "Bonjour!"
    assert answer.headers["X-Ringside-Model-Used"] == FLASH
    sent = google.last
    assert sent.path == (
        f"/v1/projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/"
        "gemini-2.5-flash:generateContent"
    )
    assert bearer(sent) in endpoint.issued and "x-goog-api-key" not in sent.headers
    claims = endpoint.requests[-1].claims
    assert "cloud-platform" in claims["scope"]


def test_a_stream_through_vertex(proc: SidecarProcess, google: FakeGemini) -> None:
    google.script(Reply(text="one two three", chunks=3, prompt_tokens=9, output_tokens=3))
    answer = post_chat(
        proc, {"model": FLASH, "messages": HELLO, "stream": True,
               "stream_options": {"include_usage": True}},
    )  # fmt: skip
    payloads = sse_events(answer.body)
    assert payloads[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(p) for p in payloads[:-1]]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 12
    assert google.last.method == "streamGenerateContent" and google.last.query == {"alt": "sse"}


WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
}  # fmt: skip


def test_a_tool_round_trip_and_a_streamed_tool_call_through_vertex(
    proc: SidecarProcess, google: FakeGemini
) -> None:
    google.script(Reply(text="", calls=[Call("get_weather", {"city": "Oslo"})]))
    client = sdk(proc)
    messages: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}]
    first = client.chat.completions.create(model=FLASH, messages=messages, tools=[WEATHER])  # type: ignore[list-item]
    (call,) = first.choices[0].message.tool_calls or []
    google.script(Reply(text="Snow."))
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "snow, -3 C"},
    ]
    second = client.chat.completions.create(model=FLASH, messages=messages, tools=[WEATHER])  # type: ignore[list-item]
    assert second.choices[0].message.content == "Snow."
    result = google.last.body["contents"][2]["parts"][0]["functionResponse"]
    assert result == {"id": call.id, "name": "get_weather", "response": {"output": "snow, -3 C"}}

    google.script(Reply(text="", calls=[Call("get_weather", {"city": "Rome"}, "fc-9")]))
    answer = post_chat(
        proc, {"model": FLASH, "messages": HELLO, "stream": True, "tools": [WEATHER]}
    )
    chunks = [ChatCompletionChunk.model_validate_json(p) for p in sse_events(answer.body)[:-1]]
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [(d.id, d.function.arguments) for d in deltas] == [("fc-9", '{"city":"Rome"}')]  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_structured_output_through_vertex_with_one_reprompt(
    proc: SidecarProcess, google: FakeGemini
) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    google.script(Reply(text="{}"), Reply(text='{"city": "Oslo"}'))
    answer = post_chat(
        proc, {"model": FLASH, "messages": HELLO, "response_format": {
            "type": "json_schema", "json_schema": {"name": "place", "schema": schema}}},
    )  # fmt: skip
    assert answer.status == 200, answer.body
    assert json.loads(answer.json()["choices"][0]["message"]["content"]) == {"city": "Oslo"}
    assert answer.headers["X-Ringside-Schema-Reprompts"] == "1"
    assert google.received[0].body["generationConfig"]["responseJsonSchema"] == schema


def test_a_token_near_expiry_is_refreshed_in_the_background_and_used(
    proc: SidecarProcess, google: FakeGemini, endpoint: FakeTokenEndpoint
) -> None:
    # the first token lived 302 s: its refresh was due 2 s after the sidecar started
    deadline = time.monotonic() + 15
    while len(endpoint.issued) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(endpoint.issued) >= 2  # fetched with no request asking for it
    newest = endpoint.issued[-1]
    answer = post_chat(proc, {"model": FLASH, "messages": HELLO})
    assert answer.status == 200 and bearer(google.last) == newest


def test_a_rejected_token_escalates_to_the_next_provider(
    proc: SidecarProcess, google: FakeGemini, fake_openai: FakeOpenAI
) -> None:
    message = "Request had invalid authentication credentials."
    google.script(Reply(status=401, error_status="UNAUTHENTICATED", error_message=message))
    answer = post_chat(proc, {"model": [FLASH, MINI], "messages": HELLO})
    assert answer.status == 200, answer.body
    assert answer.headers["X-Ringside-Models-Tried"] == f"{FLASH},{MINI}"
    assert fake_openai.models_called() == ["gpt-4o-mini"]
    google.script(Reply(status=429, error_status="RESOURCE_EXHAUSTED", retry_delay="3s"))
    limited = post_chat(proc, {"model": FLASH, "messages": HELLO})
    assert limited.status == 503 and limited.headers["Retry-After"] == "3"


def test_without_a_key_file_the_token_comes_from_the_metadata_server(
    fake_vertex: FakeGemini, tokens: set[str], tmp_path: Path
) -> None:
    metadata = FakeMetadataServer(tokens)
    metadata.server.start()
    config = {
        "storage": {"backend": "memory"},
        "providers": {
            "vertex": {"kind": "vertex", "base_url": fake_vertex.url, "project": PROJECT,
                       "location": LOCATION, "timeout": {"connect": 2, "read": 5}},
        },
    }  # fmt: skip
    gcloud = tmp_path / "gcloud"  # no gcloud user credentials either
    gcloud.mkdir()
    env = {
        "GOOGLE_APPLICATION_CREDENTIALS": "", "CLOUDSDK_CONFIG": str(gcloud),
        "GCE_METADATA_HOST": metadata.host, "GCE_METADATA_IP": metadata.host,
        "NO_PROXY": "127.0.0.1,localhost",
    }  # fmt: skip
    proc = start_sidecar(tmp_path, config, env).start()
    try:
        fake_vertex.reset()
        answer = post_chat(proc, {"model": FLASH, "messages": HELLO})
        assert answer.status == 200, answer.body
        assert bearer(fake_vertex.last) == metadata.issued[-1]
        assert fake_vertex.problems() == [] and metadata.problems == []
        assert "https://www.googleapis.com/auth/cloud-platform" in metadata.token_scopes[-1]
    finally:
        proc.stop()
        metadata.server.stop()


# -- the token fetch leaves as the provider's calls do (its proxy, or none) ----------------------
def proxied_vertex(fake_vertex: FakeGemini, proxy: str) -> dict[str, Any]:
    return {
        "storage": {"backend": "memory"},
        "providers": {
            "vertex": {"kind": "vertex", "base_url": fake_vertex.url, "project": PROJECT,
                       "location": LOCATION, "proxy": proxy, "timeout": {"connect": 2, "read": 5}},
        },
    }  # fmt: skip


def bearer_through(fake_vertex: FakeGemini, tmp_path: Path, proxy: str, env: dict[str, str]) -> str:
    """The bearer token a chat through a sidecar whose vertex provider has `proxy:` reached
    Vertex AI with (the sidecar stopped after it)."""
    proc = start_sidecar(tmp_path, proxied_vertex(fake_vertex, proxy), env).start()
    try:
        fake_vertex.reset()
        answer = post_chat(proc, {"model": FLASH, "messages": HELLO})
        assert answer.status == 200, answer.body
        return bearer(fake_vertex.last)
    finally:
        proc.stop()


def test_the_token_is_fetched_through_the_providers_own_proxy(
    fake_vertex: FakeGemini, endpoint: FakeTokenEndpoint, key_file: Path, tmp_path: Path
) -> None:
    """A provider with `proxy:` (an egress-locked cluster): the token endpoint is reached
    through that proxy too, not directly (NO_PROXY of the environment does not apply)."""
    proxy = ConnectProxy().start()
    env = {"GOOGLE_APPLICATION_CREDENTIALS": str(key_file), "NO_PROXY": "127.0.0.1,localhost"}
    try:
        assert bearer_through(fake_vertex, tmp_path, proxy.url(), env) in endpoint.issued
    finally:
        proxy.stop()
    assert f"POST {endpoint.token_uri} HTTP/1.1" in proxy.lines
    assert any(fake_vertex.url.removeprefix("http://") in line for line in proxy.lines)


def test_with_a_proxy_the_metadata_server_is_still_reached_directly(
    fake_vertex: FakeGemini, tokens: set[str], tmp_path: Path
) -> None:
    metadata = FakeMetadataServer(tokens)
    metadata.server.start()
    proxy = ConnectProxy().start()
    gcloud = tmp_path / "gcloud"
    gcloud.mkdir()
    env = {
        "GOOGLE_APPLICATION_CREDENTIALS": "", "CLOUDSDK_CONFIG": str(gcloud),
        "GCE_METADATA_HOST": metadata.host, "GCE_METADATA_IP": metadata.host,
    }  # fmt: skip
    try:
        assert bearer_through(fake_vertex, tmp_path, proxy.url(), env) == metadata.issued[-1]
    finally:
        proxy.stop()
        metadata.server.stop()
    assert not any("computeMetadata" in line for line in proxy.lines)
    assert any(fake_vertex.url.removeprefix("http://") in line for line in proxy.lines)


def test_a_direct_provider_fetches_its_token_directly_whatever_the_environment(
    fake_vertex: FakeGemini, endpoint: FakeTokenEndpoint, key_file: Path, tmp_path: Path
) -> None:
    """`proxy: ""` is direct for the token fetch too: an environment proxy that refuses
    everything is not used."""
    refusing = ConnectProxy(
        b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
    ).start()
    env = {
        "GOOGLE_APPLICATION_CREDENTIALS": str(key_file), "NO_PROXY": "",
        "HTTP_PROXY": refusing.url(), "HTTPS_PROXY": refusing.url(),
        "http_proxy": refusing.url(), "https_proxy": refusing.url(),
    }  # fmt: skip
    try:
        assert bearer_through(fake_vertex, tmp_path, "", env) in endpoint.issued
    finally:
        refusing.stop()
    assert refusing.lines == []
