"""Every OpenAI-compatible kind (one row of COMPAT_KINDS each) through a real sidecar.

One sidecar has a provider of every kind, each pointed (`base_url`) at the fake OpenAI upstream,
which speaks the protocol they all share and records what it receives. Driven through the
official `openai` SDK, a test per behaviour runs over all rows: what reached the upstream (path,
auth header or none, parameters dropped or renamed, the SPEC 2.3 path the kind's flags chose,
stream_options) and that the answers parse as `ChatCompletion` / `ChatCompletionChunk`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from sidecar.providers.base import UpstreamCall
from sidecar.providers.openai_compat import COMPAT_KINDS, OpenAICompatAdapter
from sidecar.settings.model import ProviderSettings
from tests.conftest import PROVIDER_KEY
from tests.procs import SidecarProcess
from tests.support import (
    HELLO,
    metric,
    metric_samples,
    module_sidecar,
    post_chat,
    request,
    sdk,
    sse_events,
    without_circuit_breakers,
)
from tests.upstreams.openai_fake import FakeOpenAI, Reply

KINDS = sorted(COMPAT_KINDS)
KEYLESS = "ollama"  # configured without a key: a local ollama takes none

# each kind's public endpoint, as its provider's SDK or OpenAI-compatibility page gives it
DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "vllm": "http://127.0.0.1:8000/v1",
    "mistral": "https://api.mistral.ai/v1",
    "groq": "https://api.groq.com/openai/v1",
    "together": "https://api.together.xyz/v1",
    "fireworks": "https://api.fireworks.ai/inference/v1",
    "deepseek": "https://api.deepseek.com",
    "xai": "https://api.x.ai/v1",
    "perplexity": "https://api.perplexity.ai",
    "openrouter": "https://openrouter.ai/api/v1",
    "cerebras": "https://api.cerebras.ai/v1",
    "deepinfra": "https://api.deepinfra.com/v1/openai",
    "ollama": "http://127.0.0.1:11434/v1",
}
# the SPEC 2.3 path a json_schema request takes per kind: native, json_object mode plus the
# instruction, or the instruction alone
SCHEMA_PATH = {
    "openai": "native",
    "vllm": "native",
    "mistral": "native",
    "groq": "json_object",
    "together": "native",
    "fireworks": "native",
    "deepseek": "json_object",
    "xai": "native",
    "perplexity": "native",
    "openrouter": "native",
    "cerebras": "native",
    "deepinfra": "json_object",
    "ollama": "native",
}
# where each kind's stream reports usage (the fake answers that way)
STREAM_USAGE = {
    "mistral": "final",
    "together": "final",
    "fireworks": "final",
    "perplexity": "final",
    "groq": "x_groq",
}
TAKES_N = {"openai", "vllm", "mistral", "together", "fireworks", "xai", "deepinfra"}
NO_TOOLS = {"perplexity"}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
CITY_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "place",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def model(kind: str) -> str:
    return f"fc:{kind}/m-{kind}"


def gateway_config(upstream_url: str) -> dict[str, Any]:
    providers: dict[str, Any] = {}
    models: dict[str, Any] = {}
    for index, kind in enumerate(KINDS):
        provider: dict[str, Any] = {
            "kind": kind,
            "base_url": upstream_url,
            "timeout": {"connect": 2, "read": 5},
        }
        if kind != KEYLESS:
            provider["api_key_env"] = "TEST_OPENAI_KEY"
        providers[kind] = provider
        # no `caps:` list: each entry has its kind's capability flags
        models[model(kind)] = {
            "input_per_mtok": 0.1 + index / 100,
            "output_per_mtok": 0.2 + index / 100,
            "context": 128000,
        }
    providers["openrouter"] |= {"app_url": "https://app.example", "app_name": "Example App"}
    models["fc:groq/explicit"] = {  # an explicit list wins over the kind's flags
        "input_per_mtok": 5.0,
        "output_per_mtok": 5.0,
        "caps": ["json_schema"],
    }
    slots = {"n-cascade": [model("groq"), model("openai")]}
    return without_circuit_breakers(
        {"storage": {"backend": "memory"}, "providers": providers, "models": models, "slots": slots}
    )


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    yield from module_sidecar(tmp_path_factory.mktemp("compat"), gateway_config(_openai_server.url))


@pytest.fixture
def fake(_openai_server: FakeOpenAI, gateway: SidecarProcess) -> FakeOpenAI:
    _openai_server.reset()
    return _openai_server


def only_request(fake: FakeOpenAI) -> tuple[str, dict[str, str], dict[str, Any]]:
    assert len(fake.received) == 1, [r.body for r in fake.received]
    received = fake.received[0]
    headers = {k.lower(): v for k, v in received.headers.items()}
    return received.path, headers, received.body


def system_texts(body: dict[str, Any]) -> str:
    return " ".join(str(m.get("content")) for m in body["messages"] if m.get("role") == "system")


# -- plain chat -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_chat_reaches_the_kind_with_its_auth_and_parameters(
    kind: str, gateway: SidecarProcess, fake: FakeOpenAI
) -> None:
    raw = sdk(gateway).chat.completions.with_raw_response.create(
        model=model(kind),
        messages=[{"role": "user", "content": "hi", "name": "alice"}],
        seed=7,
        max_completion_tokens=50,
        user="end-user-1",
        logit_bias={"42": 1},
        n=1,
        metadata={"app": "tests"},
    )
    answer = ChatCompletion.model_validate(json.loads(raw.content))
    assert answer.choices[0].message.content == "Hello from the fake upstream."
    assert raw.headers["x-ringside-model-used"] == model(kind)

    path, headers, body = only_request(fake)
    assert path == "/v1/chat/completions"
    if kind == KEYLESS:
        assert "authorization" not in headers
    else:
        assert headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert body["model"] == f"m-{kind}"
    row = COMPAT_KINDS[kind]
    for name, value in {"seed": 7, "max_completion_tokens": 50, "user": "end-user-1",
                        "logit_bias": {"42": 1}, "metadata": {"app": "tests"}}.items():  # fmt: skip
        renamed = row.rename_params.get(name)
        if name in row.drop_params:
            assert name not in body, (name, body)
        elif renamed is not None:
            assert name not in body and body[renamed] == value, (name, body)
        else:
            assert body[name] == value, (name, body)
    assert ("n" in body) is (kind in TAKES_N)
    assert ("name" in body["messages"][0]) is (kind != "groq")  # groq: messages[].name is a 400


@pytest.mark.parametrize(
    ("kind", "sent"),
    [
        ("mistral", {"random_seed": 7, "max_tokens": 50}),
        ("deepseek", {"seed": 7, "max_tokens": 50}),
        ("ollama", {"seed": 7, "max_tokens": 50}),
        ("openai", {"seed": 7, "max_completion_tokens": 50}),
        ("groq", {"seed": 7, "max_completion_tokens": 50}),
    ],
)
def test_renamed_parameters_reach_the_kind_under_its_own_names(
    kind: str, sent: dict[str, int], gateway: SidecarProcess, fake: FakeOpenAI
) -> None:
    sdk(gateway).chat.completions.create(
        model=model(kind), messages=HELLO, seed=7, max_completion_tokens=50
    )
    _, _, body = only_request(fake)
    names = {"seed", "random_seed", "max_tokens", "max_completion_tokens"}
    assert {k: v for k, v in body.items() if k in names} == sent


def test_the_output_cap_under_both_names_reaches_max_tokens_as_the_smaller(
    gateway: SidecarProcess, fake: FakeOpenAI
) -> None:
    sdk(gateway).chat.completions.create(
        model=model("together"), messages=HELLO, max_tokens=80, max_completion_tokens=30
    )
    _, _, body = only_request(fake)
    assert body["max_tokens"] == 30 and "max_completion_tokens" not in body


def test_openrouter_names_the_app_from_its_settings(
    gateway: SidecarProcess, fake: FakeOpenAI
) -> None:
    sdk(gateway).chat.completions.create(model=model("openrouter"), messages=HELLO)
    _, headers, _ = only_request(fake)
    assert headers["http-referer"] == "https://app.example"
    assert headers["x-title"] == "Example App"


# -- streams --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("include_usage", [False, True])
def test_a_stream_parses_and_reports_usage_as_asked(
    kind: str, include_usage: bool, gateway: SidecarProcess, fake: FakeOpenAI
) -> None:
    fake.script(Reply(content="one two three", stream_usage=STREAM_USAGE.get(kind, "asked")))
    before = metric_samples(gateway)
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = sdk(gateway).chat.completions.create(
        model=model(kind), messages=HELLO, stream=True, **options
    )
    chunks = list(stream)
    assert all(isinstance(chunk, ChatCompletionChunk) for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    usages = [chunk.usage for chunk in chunks if chunk.usage is not None]
    if include_usage:
        assert [(u.prompt_tokens, u.completion_tokens) for u in usages] == [(11, 7)]
    else:
        assert usages == []

    _, _, body = only_request(fake)
    assert body["stream"] is True
    row = COMPAT_KINDS[kind]
    if "stream_options" in row.drop_params:
        assert "stream_options" not in body
    else:
        assert body["stream_options"] == {"include_usage": True}
    # the upstream's own usage is what is counted, wherever the kind reports it
    after = metric_samples(gateway)
    for token_kind, count in (("prompt", 11), ("completion", 7)):
        labels = {"provider": kind, "model": model(kind), "kind": token_kind}
        grew = metric(after, "ringside_tokens_total", **labels) - metric(
            before, "ringside_tokens_total", **labels
        )
        assert grew == count, (token_kind, grew)


def test_a_stream_without_usage_is_still_charged_an_estimate(
    gateway: SidecarProcess, fake: FakeOpenAI
) -> None:
    fake.script(Reply(content="x" * 400, stream_usage="none"))
    before = metric_samples(gateway)
    chunks = list(
        sdk(gateway).chat.completions.create(model=model("xai"), messages=HELLO, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "x" * 400
    after = metric_samples(gateway)
    labels = {"provider": "xai", "model": model("xai"), "kind": "completion"}
    grew = metric(after, "ringside_tokens_total", **labels) - metric(
        before, "ringside_tokens_total", **labels
    )
    assert grew == 100  # a token per 4 characters produced


# -- tools ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [False, True])
def test_tools_reach_the_kinds_that_take_them(
    kind: str, stream: bool, gateway: SidecarProcess, fake: FakeOpenAI
) -> None:
    fake.script(Reply(tool_calls=[TOOL_CALL], finish_reason="tool_calls"))
    client = sdk(gateway)
    ask: dict[str, Any] = {
        "model": model(kind),
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": "auto",
    }
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **ask))
        calls = [
            call
            for chunk in chunks
            for choice in chunk.choices
            for call in choice.delta.tool_calls or []
        ]
        assert [c.function.name for c in calls if c.function] == ["get_weather"]
    else:
        answer = client.chat.completions.create(**ask)
        assert answer.choices[0].finish_reason == "tool_calls"
        calls_done = answer.choices[0].message.tool_calls or []
        assert json.loads(calls_done[0].function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    _, _, body = only_request(fake)
    if kind in NO_TOOLS:
        assert "tools" not in body and "tool_choice" not in body
    else:
        assert body["tools"] == [WEATHER_TOOL] and body["tool_choice"] == "auto"


@pytest.mark.parametrize("kind", sorted(set(KINDS) - NO_TOOLS))
def test_a_tool_result_turn_reaches_the_kind(
    kind: str, gateway: SidecarProcess, fake: FakeOpenAI
) -> None:
    answer = sdk(gateway).chat.completions.create(
        model=model(kind),
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    assert answer.choices[0].message.content
    _, _, body = only_request(fake)
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "tool"]
    assert body["messages"][1]["tool_calls"] == [TOOL_CALL]


# -- structured output ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_json_schema_takes_the_path_the_kind_flags_choose(
    kind: str, gateway: SidecarProcess, fake: FakeOpenAI
) -> None:
    fake.script(Reply(content='{"city": "Paris"}'))
    answer = sdk(gateway).chat.completions.create(
        model=model(kind),
        messages=HELLO,
        response_format=CITY_FORMAT,  # type: ignore[arg-type]
    )
    assert json.loads(answer.choices[0].message.content or "") == {"city": "Paris"}
    _, _, body = only_request(fake)
    path = SCHEMA_PATH[kind]
    if path == "native":
        assert body["response_format"] == CITY_FORMAT
        assert "place" not in system_texts(body) and '"city"' not in system_texts(body)
    else:
        assert '"city"' in system_texts(body)  # the schema went in as an instruction
        expected = {"type": "json_object"} if path == "json_object" else None
        assert body.get("response_format") == expected


@pytest.mark.parametrize("kind", ["perplexity", "deepseek"])
def test_json_object_mode_goes_native_only_where_the_kind_has_it(
    kind: str, gateway: SidecarProcess, fake: FakeOpenAI
) -> None:
    fake.script(Reply(content='{"ok": true}'))
    answer = sdk(gateway).chat.completions.create(
        model=model(kind), messages=HELLO, response_format={"type": "json_object"}
    )
    assert json.loads(answer.choices[0].message.content or "") == {"ok": True}
    _, _, body = only_request(fake)
    if COMPAT_KINDS[kind].caps.json_object:
        assert body["response_format"] == {"type": "json_object"}
    else:  # perplexity: no JSON mode, the instruction alone
        assert "response_format" not in body and "JSON" in system_texts(body)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("response_format", [CITY_FORMAT, {"type": "json_object"}])
def test_a_streamed_structured_request_streams_only_where_the_format_is_native(
    kind: str, response_format: dict[str, Any], gateway: SidecarProcess, fake: FakeOpenAI
) -> None:
    fake.script(Reply(content='{"city": "Paris"}', stream_usage=STREAM_USAGE.get(kind, "asked")))
    chunks = list(
        sdk(gateway).chat.completions.create(
            model=model(kind),
            messages=HELLO,
            response_format=response_format,  # type: ignore[arg-type]
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(text) == {"city": "Paris"}
    _, _, body = only_request(fake)
    caps = COMPAT_KINDS[kind].caps
    native = caps.json_object if response_format["type"] == "json_object" else caps.json_schema
    if native:  # streamed through, validated at its end
        assert body["stream"] is True and body["response_format"] == response_format
    else:  # the re-prompt loop runs buffered: the upstream call does not stream
        assert "stream" not in body and system_texts(body)


# -- n > 1 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(set(KINDS) - TAKES_N))
def test_n_above_one_on_a_kind_without_it_is_a_400_naming_the_provider(
    kind: str, gateway: SidecarProcess, fake: FakeOpenAI
) -> None:
    answer = post_chat(gateway, {"model": model(kind), "messages": HELLO, "n": 2})
    assert answer.status == 400
    error = answer.error
    assert error["param"] == "n" and error["code"] == "invalid_request"
    assert repr(kind) in error["message"]
    assert fake.received == []


@pytest.mark.parametrize("kind", sorted(TAKES_N))
def test_n_above_one_reaches_the_kinds_that_take_it(
    kind: str, gateway: SidecarProcess, fake: FakeOpenAI
) -> None:
    sdk(gateway).chat.completions.create(model=model(kind), messages=HELLO, n=2)
    _, _, body = only_request(fake)
    assert body["n"] == 2


def test_a_cascade_passes_over_a_candidate_without_n(
    gateway: SidecarProcess, fake: FakeOpenAI
) -> None:
    raw = sdk(gateway).chat.completions.with_raw_response.create(
        model="slot:n-cascade", messages=HELLO, n=2
    )
    assert raw.headers["x-ringside-model-used"] == model("openai")
    _, _, body = only_request(fake)
    assert body["model"] == "m-openai" and body["n"] == 2


def test_a_streamed_n_on_a_kind_without_it_is_the_same_400(
    gateway: SidecarProcess, fake: FakeOpenAI
) -> None:
    answer = post_chat(gateway, {"model": model("groq"), "messages": HELLO, "n": 3, "stream": True})
    assert answer.status == 400 and answer.error["param"] == "n"
    assert fake.received == []


# -- capability flags: match: and /v1/models ------------------------------------------------------


def test_match_caps_uses_the_kind_flags_of_entries_without_a_list(
    gateway: SidecarProcess, fake: FakeOpenAI
) -> None:
    client = sdk(gateway)
    raw = client.chat.completions.with_raw_response.create(
        model="match:caps=tools,provider=perplexity|xai", messages=HELLO
    )
    assert raw.headers["x-ringside-model-used"] == model("xai")  # perplexity has no tools
    raw = client.chat.completions.with_raw_response.create(
        model="match:caps=vision+n,provider=deepseek|cerebras|deepinfra", messages=HELLO
    )
    assert raw.headers["x-ringside-model-used"] == model("deepinfra")
    none = post_chat(gateway, {"model": "match:caps=vision,provider=cerebras", "messages": HELLO})
    assert none.status == 404 and none.error["code"] == "model_not_found"


def test_an_explicit_caps_list_wins_over_the_kind_flags(
    gateway: SidecarProcess, fake: FakeOpenAI
) -> None:
    raw = sdk(gateway).chat.completions.with_raw_response.create(
        model="match:caps=json_schema,provider=groq", messages=HELLO
    )
    assert raw.headers["x-ringside-model-used"] == "fc:groq/explicit"


def test_the_models_list_shows_each_kind_flags(gateway: SidecarProcess) -> None:
    answer = request(gateway.url, "GET", "/v1/models")
    listed = {entry["id"]: entry for entry in answer.json()["data"]}
    for kind in KINDS:
        caps = COMPAT_KINDS[kind].caps
        # embeddings is a model's own (the catalog says which model embeds), never the kind's
        expected = {*caps.names(), "stream"} - {"embeddings"}
        assert set(listed[model(kind)]["capabilities"]) == expected, kind
    assert listed[model("perplexity")]["capabilities"] == sorted(
        ["json_schema", "stream", "usage_in_stream", "vision"]
    )
    assert listed["fc:groq/explicit"]["capabilities"] == ["json_schema"]


# -- in process: the URL and headers each row builds ----------------------------------------------


def settings(kind: str, **fields: Any) -> ProviderSettings:
    return ProviderSettings(name=kind, kind=kind, base_url=None, api_key_env=None, **fields)


@pytest.mark.parametrize("kind", KINDS)
def test_a_kind_without_base_url_calls_its_public_endpoint(kind: str) -> None:
    adapter = OpenAICompatAdapter(settings(kind, api_key="k"), COMPAT_KINDS[kind])
    built = adapter.build_request(UpstreamCall(settings(kind), "m", {"messages": HELLO}))
    assert built.url == DEFAULT_BASE_URLS[kind] + "/chat/completions"
    assert built.headers["Authorization"] == "Bearer k"


def test_every_compatible_kind_of_the_spec_is_a_row() -> None:
    assert set(COMPAT_KINDS) == set(DEFAULT_BASE_URLS)


@pytest.mark.parametrize("kind", KINDS)
def test_no_key_means_no_auth_header(kind: str) -> None:
    adapter = OpenAICompatAdapter(settings(kind), COMPAT_KINDS[kind])
    built = adapter.build_request(UpstreamCall(settings(kind), "m", {"messages": HELLO}))
    assert "Authorization" not in built.headers


def test_the_provider_headers_win_over_the_app_headers() -> None:
    configured = settings(
        "openrouter", app_url="https://a.example", app_name="A", headers={"X-Title": "B"}
    )
    adapter = OpenAICompatAdapter(configured, COMPAT_KINDS["openrouter"])
    assert adapter.headers["HTTP-Referer"] == "https://a.example"
    assert adapter.headers["X-Title"] == "B"


def test_the_native_json_schema_setting_wins_over_the_kind_flag() -> None:
    adapter = OpenAICompatAdapter(settings("groq", native_json_schema=True), COMPAT_KINDS["groq"])
    assert adapter.native_json_schema and not adapter.caps.json_schema


def test_a_stream_that_reports_usage_unasked_on_a_content_chunk_loses_it() -> None:
    adapter = OpenAICompatAdapter(settings("together"), COMPAT_KINDS["together"])
    decoder = adapter.stream_decoder(UpstreamCall(settings("together"), "m", {}, stream=True))
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    (out,) = decoder.feed(None, json.dumps(chunk).encode())
    assert "usage" not in json.loads(out)
    assert decoder.usage is not None and decoder.usage.total_tokens == 7


def test_sse_events_of_a_raw_stream_are_chunks(gateway: SidecarProcess, fake: FakeOpenAI) -> None:
    answer = post_chat(gateway, {"model": model("mistral"), "messages": HELLO, "stream": True})
    events = sse_events(answer.body)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        ChatCompletionChunk.model_validate_json(event)
