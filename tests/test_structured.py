"""Structured output (SPEC 2.3): response_format enforced across providers, natively or not."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from tests.conftest import openai_config
from tests.procs import SidecarProcess
from tests.support import (
    REPO_ROOT,
    metric,
    metric_samples,
    module_sidecar,
    post_chat,
    sdk,
    sse_events,
    without_circuit_breakers,
)
from tests.upstreams.openai_fake import FakeOpenAI, Reply

MINI = "fc:openai/gpt-4o-mini"
BIG = "fc:openai/gpt-4o"
COMPAT = "fc:compat/json-model"  # a provider configured with native_json_schema: false
ASK = [{"role": "user", "content": "Where is the Eiffel tower?"}]
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}
CITY_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "place", "schema": CITY_SCHEMA, "strict": True},
}
PARIS = '{"city": "Paris", "country": "France"}'


class Place(BaseModel):
    city: str
    country: str


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    config = openai_config(_openai_server.url)
    config["providers"]["compat"] = {
        "kind": "openai",
        "base_url": _openai_server.url,
        "api_key_env": "TEST_OPENAI_KEY",
        "native_json_schema": False,
    }
    config["models"][COMPAT] = {"input_per_mtok": 1.0, "output_per_mtok": 2.0, "caps": ["tools"]}
    yield from module_sidecar(
        tmp_path_factory.mktemp("structured"), without_circuit_breakers(config)
    )


def ask(model: str | list[str] = MINI, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": ASK, "response_format": CITY_FORMAT, **extra}


def content_of(answer: Any) -> str:
    return str(answer.json()["choices"][0]["message"]["content"])


# -- the SDK and what each kind of provider receives -----------------------------------------


def test_sdk_parse_returns_a_parsed_object(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content=PARIS))
    completion = sdk(gateway).chat.completions.parse(
        model=MINI, messages=ASK, response_format=Place
    )
    assert completion.choices[0].message.parsed == Place(city="Paris", country="France")


def test_native_provider_receives_the_json_schema_untouched(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content=PARIS))
    answer = post_chat(gateway, ask())
    assert answer.status == 200
    sent = fake_openai.received[0].body
    assert sent["response_format"] == CITY_FORMAT
    assert sent["messages"] == ASK


def test_non_native_provider_gets_a_system_instruction_and_json_mode(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content=PARIS))
    answer = post_chat(gateway, ask(COMPAT))
    assert answer.status == 200
    sent = fake_openai.received[0].body
    assert sent["response_format"] == {"type": "json_object"}
    instruction, *rest = sent["messages"]
    assert instruction["role"] == "system"
    assert json.dumps(CITY_SCHEMA, separators=(",", ":")) in instruction["content"]
    assert rest == ASK
    assert json.loads(content_of(answer)) == {"city": "Paris", "country": "France"}


def test_instruction_follows_the_callers_own_system_message(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content=PARIS))
    own = {"role": "system", "content": "You are a geographer."}
    post_chat(gateway, {**ask(COMPAT), "messages": [own, *ASK]})
    messages = fake_openai.received[0].body["messages"]
    assert messages[0] == own
    assert messages[1]["role"] == "system" and "JSON Schema" in messages[1]["content"]
    assert messages[2:] == ASK


# -- parsing, validation and re-prompts ------------------------------------------------------


@pytest.mark.parametrize(
    "sent", [PARIS, f"```json\n{PARIS}\n```"], ids=["bare", "fenced-returned-bare"]
)
def test_valid_first_answer_needs_no_reprompt(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, sent: str
) -> None:
    fake_openai.script(Reply(content=sent))
    answer = post_chat(gateway, ask())
    assert answer.status == 200
    assert answer.headers["X-Ringside-Schema-Reprompts"] == "0"
    assert content_of(answer) == PARIS
    assert len(fake_openai.received) == 1


def test_request_without_response_format_has_no_reprompt_header(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(gateway, {"model": MINI, "messages": ASK})
    assert answer.status == 200
    assert answer.headers["X-Ringside-Schema-Reprompts"] is None


def test_invalid_json_is_reprompted_with_the_answer_and_the_error(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content="Sure! It is in Paris."), Reply(content=PARIS))
    answer = post_chat(gateway, ask())
    assert answer.status == 200
    assert answer.headers["X-Ringside-Schema-Reprompts"] == "1"
    assert content_of(answer) == PARIS
    first, second = (r.body["messages"] for r in fake_openai.received)
    assert first == ASK
    assert second[: len(ASK)] == ASK
    bad_answer, correction = second[len(ASK) :]
    assert bad_answer == {"role": "assistant", "content": "Sure! It is in Paris."}
    assert correction["role"] == "user"
    assert "- (root): the answer is not valid JSON" in correction["content"]


def test_wrong_shape_reprompt_lists_json_pointers_and_messages(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content='{"city": 75}'), Reply(content=PARIS))
    answer = post_chat(gateway, ask())
    assert answer.headers["X-Ringside-Schema-Reprompts"] == "1"
    correction = fake_openai.received[1].body["messages"][-1]["content"]
    assert '- (root): "country" is a required property' in correction
    assert '- /city: 75 is not of type "string"' in correction
    assert fake_openai.received[1].body["messages"][-2]["content"] == '{"city": 75}'


def test_right_on_the_third_try_sums_the_usage_of_every_call(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(
        Reply(content="nope", prompt_tokens=10, completion_tokens=1),
        Reply(content='{"city": "Paris"}', prompt_tokens=20, completion_tokens=2),
        Reply(content=PARIS, prompt_tokens=30, completion_tokens=3),
    )
    answer = post_chat(gateway, ask())
    assert answer.status == 200
    assert answer.headers["X-Ringside-Schema-Reprompts"] == "2"
    assert answer.json()["usage"] == {
        "prompt_tokens": 60,
        "completion_tokens": 6,
        "total_tokens": 66,
    }
    # 60 prompt tokens x $0.15/M + 6 completion tokens x $0.60/M
    assert float(answer.headers["X-Ringside-Cost-USD"]) == pytest.approx(60 * 0.15e-6 + 6 * 0.6e-6)


def test_never_valid_after_two_reprompts_is_422(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model("gpt-4o-mini", Reply(content='{"city": "Paris"}'))
    answer = post_chat(gateway, ask())
    assert answer.status == 422
    error = answer.error
    assert error["code"] == "response_schema_validation_failed"
    assert error["type"] == "invalid_response_error"
    assert error["param"] == "response_format"
    assert '"country" is a required property' in error["message"]
    assert answer.headers["X-Ringside-Schema-Reprompts"] == "2"
    assert len(fake_openai.received) == 3


def test_cascade_escalates_to_the_model_that_satisfies_the_schema(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model("gpt-4o-mini", Reply(content="not JSON at all"))
    fake_openai.on_model("gpt-4o", Reply(content=PARIS))
    answer = post_chat(gateway, ask([MINI, BIG]))
    assert answer.status == 200
    assert answer.headers["X-Ringside-Model-Used"] == BIG
    assert answer.headers["X-Ringside-Models-Tried"] == f"{MINI},{BIG}"
    assert answer.headers["X-Ringside-Fallback-Triggered"] == "true"
    assert answer.headers["X-Ringside-Schema-Reprompts"] == "2"
    assert fake_openai.models_called() == ["gpt-4o-mini"] * 3 + ["gpt-4o"]
    assert content_of(answer) == PARIS
    assert answer.json()["usage"]["prompt_tokens"] == 4 * 11


def test_cascade_where_no_model_satisfies_the_schema_is_422(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model("gpt-4o-mini", Reply(content="[]"))
    fake_openai.on_model("gpt-4o", Reply(content="{}"))
    answer = post_chat(gateway, ask([MINI, BIG]))
    assert answer.status == 422
    assert answer.error["code"] == "response_schema_validation_failed"
    assert answer.headers["X-Ringside-Schema-Reprompts"] == "4"
    assert len(fake_openai.received) == 6


def test_json_object_content_must_be_an_object(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content="[1, 2]"), Reply(content='{"a": 1}'))
    answer = post_chat(
        gateway, {"model": MINI, "messages": ASK, "response_format": {"type": "json_object"}}
    )
    assert answer.headers["X-Ringside-Schema-Reprompts"] == "1"
    assert content_of(answer) == '{"a": 1}'
    assert (
        "expected a JSON object, got a list"
        in fake_openai.received[1].body["messages"][-1]["content"]
    )


def test_tool_call_ending_is_not_validated(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "lookup", "arguments": '{"q": "Eiffel"}'}}  # fmt: skip
    fake_openai.script(Reply(tool_calls=[call], finish_reason="tool_calls"))
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    answer = post_chat(gateway, ask(tools=tools))
    assert answer.status == 200
    assert answer.json()["choices"][0]["message"]["tool_calls"] == [call]
    assert answer.headers["X-Ringside-Schema-Reprompts"] == "0"
    assert len(fake_openai.received) == 1


def test_metrics_count_validations_and_reprompts_per_model(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    before = metric_samples(gateway)
    fake_openai.script(Reply(content="nope"), Reply(content=PARIS))
    post_chat(gateway, ask(COMPAT))
    after = metric_samples(gateway)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    validations = "ringside_schema_validations_total"
    assert delta(validations, model=COMPAT, result="invalid") == 1
    assert delta(validations, model=COMPAT, result="valid") == 1
    assert delta("ringside_schema_reprompts_total", model=COMPAT) == 1
    assert delta("ringside_upstream_requests_total", provider="compat", model=COMPAT,
                 outcome="success") == 2  # fmt: skip


# -- schemas that are not JSON Schema ---------------------------------------------------------


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "strng"},
        {"properties": {"city": {"minLength": -1}}},
        {"$ref": "#/$defs/missing"},
        {"$ref": "https://schemas.example/remote.json"},
    ],
    ids=["unknown-type", "negative-minLength", "dangling-ref", "remote-ref"],
)
def test_invalid_schema_is_400_naming_response_format(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, schema: dict[str, Any]
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}}
    answer = post_chat(gateway, ask(response_format=response_format))
    assert answer.status == 400
    assert answer.error["code"] == "invalid_request"
    assert answer.error["param"] == "response_format"
    assert fake_openai.received == []


def test_invalid_schema_is_refused_before_routing(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}
    answer = post_chat(gateway, ask("fc:nowhere/model", response_format=response_format))
    assert answer.status == 400
    assert answer.error["param"] == "response_format"


def test_a_catastrophic_pattern_is_matched_in_linear_time(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    # a backtracking engine takes exponential time for ^(a|aa)+$ against 60 a's and a '!'
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a|aa)+$"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    fake_openai.on_model("gpt-4o-mini", Reply(content=json.dumps({"s": "a" * 60 + "!"})))
    started = time.monotonic()
    answer = post_chat(gateway, ask(response_format=response_format))
    assert time.monotonic() - started < 2
    assert answer.status == 422
    assert answer.error["code"] == "response_schema_validation_failed"
    assert '/s: "' + "a" * 60 + '!" does not match "^(a|aa)+$"' in answer.error["message"]


def test_a_lookaround_pattern_is_400_saying_why(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    schema = {"type": "string", "pattern": "^(?=.*[0-9])[a-z0-9]+$"}
    response_format = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
    answer = post_chat(gateway, ask(response_format=response_format))
    assert answer.status == 400
    assert answer.error["param"] == "response_format"
    assert "lookaround" in answer.error["message"]
    assert fake_openai.received == []


def test_unevaluated_properties_with_pattern_properties_is_enforced(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    schema = {"patternProperties": {"^x": True}, "unevaluatedProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "u", "schema": schema}}
    fake_openai.script(Reply(content='{"xa": 1, "y": 2}'), Reply(content='{"xa": 1}'))
    answer = post_chat(gateway, ask(response_format=response_format))
    assert answer.status == 200
    assert answer.headers["X-Ringside-Schema-Reprompts"] == "1"
    correction = fake_openai.received[1].body["messages"][-1]["content"]
    assert "'y'" in correction


# -- streaming ---------------------------------------------------------------------------------


def test_native_stream_is_validated_at_the_end_and_finishes_with_done(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content=PARIS, chunks=4))
    answer = post_chat(gateway, ask(stream=True))
    assert answer.status == 200
    assert answer.headers["X-Ringside-Schema-Reprompts"] == "0"
    events = sse_events(answer.body)
    assert events[-1] == "[DONE]"
    pieces = [json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]]
    assert "".join(pieces) == PARIS
    assert fake_openai.received[0].body["response_format"] == CITY_FORMAT


def test_native_stream_that_fails_the_schema_ends_with_an_error_event(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reply(content='{"city": "Paris"}', chunks=3))
    answer = post_chat(gateway, ask(stream=True))
    events = sse_events(answer.body)
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["code"] == "response_schema_validation_failed"
    assert error["param"] == "response_format"
    assert '"country" is a required property' in error["message"]
    assert len(fake_openai.received) == 1


def test_native_stream_ending_in_tool_calls_is_not_validated(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "lookup", "arguments": '{"q": "Eiffel"}'}}  # fmt: skip
    fake_openai.script(Reply(tool_calls=[call], finish_reason="tool_calls"))
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    answer = post_chat(gateway, ask(stream=True, tools=tools))
    events = sse_events(answer.body)
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    assert [d["tool_calls"] for d in deltas if "tool_calls" in d] == [[{"index": 0, **call}]]


def test_non_native_stream_runs_the_loop_buffered_and_streams_the_valid_answer(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(
        Reply(content="nope", prompt_tokens=10, completion_tokens=1),
        Reply(content=f"```\n{PARIS}\n```", prompt_tokens=20, completion_tokens=9),
    )
    raw = sdk(gateway).chat.completions.with_raw_response.create(
        **ask(COMPAT, stream=True, stream_options={"include_usage": True})
    )
    assert raw.headers["X-Ringside-Schema-Reprompts"] == "1"
    chunks = list(raw.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == PARIS
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (30, 10)
    assert [("stream" in r.body) for r in fake_openai.received] == [False, False]


def test_non_native_stream_streams_a_tool_call_ending_unvalidated(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "lookup", "arguments": '{"q": "Eiffel"}'}}  # fmt: skip
    fake_openai.script(Reply(tool_calls=[call], finish_reason="tool_calls"))
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    chunks = list(sdk(gateway).chat.completions.create(**ask(COMPAT, stream=True, tools=tools)))
    streamed = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    assert len(streamed) == 1
    assert streamed[0][0].function.arguments == '{"q": "Eiffel"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert len(fake_openai.received) == 1


def test_non_native_stream_that_never_validates_is_a_422_json_error(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model("json-model", Reply(content="never JSON"))
    answer = post_chat(gateway, ask(COMPAT, stream=True))
    assert answer.status == 422
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.error["code"] == "response_schema_validation_failed"
    assert len(fake_openai.received) == 3


# -- the demo -----------------------------------------------------------------------------------


def test_demo_json_learner_shows_one_reprompt(tmp_path: Path) -> None:
    demo = (REPO_ROOT / "config" / "demo.yaml").read_text()
    proc = SidecarProcess(demo, workdir=str(tmp_path)).start()
    try:
        answer = post_chat(proc, ask("fc:mock/json-learner"))
    finally:
        proc.stop()
    assert answer.status == 200
    assert answer.headers["X-Ringside-Schema-Reprompts"] == "1"
    assert json.loads(content_of(answer)) == {"city": "Paris", "country": "France"}
