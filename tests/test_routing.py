"""Model refs (SPEC 2.1): fc: refs, slot expansion, match: constraints ordered by the expected cost
of *this* request, n=K, and the GET /v1/models listing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import openai_config
from tests.procs import SidecarProcess
from tests.support import HELLO, module_sidecar, post_chat, request, sdk, without_circuit_breakers
from tests.upstreams.openai_fake import FakeOpenAI, Reply

# cheap input, dear output: wins for a long prompt with a short answer
CHEAP_IN = "fc:openai/cheap-in"
# dear input, cheap output: wins for a short prompt with a long answer
CHEAP_OUT = "fc:openai/cheap-out"
LLAMA = "fc:local/llama"
STRICT = "fc:strict/only-model"


def entry(inp: float, out: float, **extra: Any) -> dict[str, Any]:
    return {"input_per_mtok": inp, "output_per_mtok": out, "max_output": 16384, **extra}


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    config = openai_config(_openai_server.url)
    config["providers"]["local"] = {"kind": "vllm", "base_url": _openai_server.url}
    config["providers"]["strict"] = {
        "kind": "openai",
        "base_url": _openai_server.url,
        "catalog_only": True,
    }
    config["models"] = {
        CHEAP_IN: entry(0.1, 10.0, context=128000, caps=["tools"], tags=["hosted"]),
        CHEAP_OUT: entry(5.0, 0.5, context=128000, caps=["tools", "json_schema"], tags=["hosted"]),
        LLAMA: entry(0.05, 0.05, context=8000, caps=[], tags=["local"]),  # an explicit none
        STRICT: entry(1.0, 1.0, context=32000, caps=["vision"], tags=["strict"]),
    }
    config["slots"] = {
        "primary": CHEAP_IN,
        "chain": [CHEAP_OUT, "slot:primary"],
        "smart": "match:caps=tools,n=2",
    }
    yield from module_sidecar(tmp_path_factory.mktemp("routing"), without_circuit_breakers(config))


def long_prompt(model: str, **extra: Any) -> dict[str, Any]:
    """~2000 prompt tokens, 1 output token: input price dominates."""
    return {"model": model, "messages": [{"role": "user", "content": "x" * 8000}],
            "max_tokens": 1, **extra}  # fmt: skip


def long_answer(model: str, **extra: Any) -> dict[str, Any]:
    """A few prompt tokens, 1000 output tokens: output price dominates."""
    return {"model": model, "messages": HELLO, "max_tokens": 1000, **extra}


def tried(answer: Any) -> list[str]:
    return str(answer.headers["X-Ringside-Models-Tried"]).split(",")


# -- fc: refs --------------------------------------------------------------------------------


def test_ref_outside_the_catalog_is_allowed_and_sent_by_its_model_id(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(gateway, {"model": "fc:openai/brand-new-model", "messages": HELLO})
    assert answer.status == 200
    assert fake_openai.models_called() == ["brand-new-model"]


def test_model_id_may_contain_slashes(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    answer = post_chat(gateway, {"model": "fc:local/meta-llama/llama-3.1-8b", "messages": HELLO})
    assert answer.status == 200
    assert answer.headers["X-Ringside-Model-Used"] == "fc:local/meta-llama/llama-3.1-8b"
    assert fake_openai.models_called() == ["meta-llama/llama-3.1-8b"]


def test_catalog_only_provider_refuses_refs_outside_the_catalog(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(gateway, {"model": "fc:strict/not-listed", "messages": HELLO})
    assert answer.status == 404
    assert answer.error["code"] == "model_not_found"
    assert post_chat(gateway, {"model": STRICT, "messages": HELLO}).status == 200


def test_repeated_refs_are_tried_once(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    fake_openai.on_model("cheap-in", Reply(status=500))
    answer = post_chat(gateway, {"model": [CHEAP_IN, "slot:primary", CHEAP_IN], "messages": HELLO})
    assert answer.status == 503
    assert fake_openai.models_called() == ["cheap-in"]


# -- slots -----------------------------------------------------------------------------------


def test_slot_with_one_ref_calls_that_model(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(gateway, {"model": "slot:primary", "messages": HELLO})
    assert answer.status == 200
    assert answer.headers["X-Ringside-Model-Used"] == CHEAP_IN
    assert fake_openai.models_called() == ["cheap-in"]


def test_slot_with_one_ref_can_stream(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    stream = sdk(gateway).chat.completions.create(model="slot:primary", messages=HELLO, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Hello from the fake upstream."


def test_slot_expands_in_order_including_nested_slots(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model("cheap-out", Reply(status=503))
    answer = post_chat(gateway, {"model": "slot:chain", "messages": HELLO})
    assert answer.status == 200
    assert tried(answer) == [CHEAP_OUT, CHEAP_IN]
    assert answer.headers["X-Ringside-Model-Used"] == CHEAP_IN
    assert answer.headers["X-Ringside-Fallback-Triggered"] == "true"
    assert fake_openai.models_called() == ["cheap-out", "cheap-in"]


def test_slot_holding_a_match_expands_by_cost(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model("cheap-in", Reply(status=500))
    fake_openai.on_model("cheap-out", Reply(status=500))
    answer = post_chat(gateway, long_prompt("slot:smart"))
    assert tried(answer) == [CHEAP_IN, CHEAP_OUT]


# -- match: ----------------------------------------------------------------------------------


def test_match_picks_the_cheapest_for_a_long_prompt(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(gateway, long_prompt("match:caps=tools"))
    assert answer.status == 200
    assert answer.headers["X-Ringside-Model-Used"] == CHEAP_IN
    assert fake_openai.models_called() == ["cheap-in"]


def test_match_picks_the_cheapest_for_a_long_answer(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(gateway, long_answer("match:caps=tools"))
    assert answer.headers["X-Ringside-Model-Used"] == CHEAP_OUT
    assert fake_openai.models_called() == ["cheap-out"]


def test_match_without_n_is_a_single_model_not_a_cascade(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model("cheap-in", Reply(status=500))
    answer = post_chat(gateway, long_prompt("match:caps=tools"))
    assert answer.status == 503
    assert tried(answer) == [CHEAP_IN]


def test_match_without_n_can_stream(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    answer = post_chat(gateway, long_prompt("match:caps=tools", stream=True))
    assert answer.status == 200
    assert answer.headers["X-Ringside-Model-Used"] == CHEAP_IN


def test_match_n_is_a_cascade_of_the_k_cheapest_in_cost_order(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.on_model("llama", Reply(status=500))
    answer = post_chat(gateway, long_answer("match:provider=openai|local,n=2"))
    assert answer.status == 200
    # a long answer: llama (0.05 out) first, then cheap-out (0.5 out); cheap-in (10 out) left out
    assert tried(answer) == [LLAMA, CHEAP_OUT]
    assert fake_openai.models_called() == ["llama", "cheap-out"]


def test_match_n_order_follows_the_request(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    for model in ("cheap-in", "cheap-out"):
        fake_openai.on_model(model, Reply(status=500))
    by_prompt = post_chat(gateway, long_prompt("match:caps=tools,n=2"))
    by_answer = post_chat(gateway, long_answer("match:caps=tools,n=2"))
    assert tried(by_prompt) == [CHEAP_IN, CHEAP_OUT]
    assert tried(by_answer) == [CHEAP_OUT, CHEAP_IN]


def test_match_n_larger_than_the_matches_tries_them_all(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    for model in ("cheap-in", "cheap-out"):
        fake_openai.on_model(model, Reply(status=500))
    answer = post_chat(gateway, long_prompt("match:tag=hosted,n=9"))
    assert answer.status == 503
    assert answer.error["code"] == "upstream_unavailable"
    assert tried(answer) == [CHEAP_IN, CHEAP_OUT]


def test_match_n_streams_as_a_cascade(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    """SPEC 2.2: the operator's match: cascade streams (tests/test_stream_cascade.py)."""
    answer = post_chat(gateway, long_prompt("match:caps=tools,n=2", stream=True))
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/event-stream")


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("match:provider=local", LLAMA),
        ("match:tag=strict", STRICT),
        ("match:caps=vision", STRICT),
        ("match:caps=tools+json_schema", CHEAP_OUT),
        ("match:ctx>=100000,out<=1", CHEAP_OUT),
        ("match:in<=0.5,caps=tools", CHEAP_IN),
        ("match:ctx>=20000,tag=strict,in<=1", STRICT),
    ],
)
def test_match_constraints_select_the_catalog_rows_that_satisfy_all(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, ref: str, expected: str
) -> None:
    answer = post_chat(gateway, long_answer(ref))
    assert answer.status == 200
    assert answer.headers["X-Ringside-Model-Used"] == expected


@pytest.mark.parametrize("ref", ["match:color=blue", "match:n=0", "match:ctx>=lots", "match:"])
def test_malformed_match_is_400_invalid_model_ref(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, ref: str
) -> None:
    answer = post_chat(gateway, long_answer(ref))
    assert answer.status == 400
    assert answer.error["code"] == "invalid_model_ref"
    assert answer.error["param"] == "model"


def test_match_that_matches_nothing_is_404(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = post_chat(gateway, long_answer("match:provider=local,caps=vision"))
    assert answer.status == 404
    assert answer.error["code"] == "model_not_found"


# -- GET /v1/models --------------------------------------------------------------------------


def test_models_listing_has_the_catalog_and_the_slots(gateway: SidecarProcess) -> None:
    listing = request(gateway.url, "GET", "/v1/models").json()
    assert listing["object"] == "list"
    ids = [model["id"] for model in listing["data"]]
    assert ids == [CHEAP_IN, CHEAP_OUT, LLAMA, STRICT, "slot:primary", "slot:chain", "slot:smart"]
    assert {model["object"] for model in listing["data"]} == {"model"}


def test_models_listing_shows_price_context_and_caps(gateway: SidecarProcess) -> None:
    listing = request(gateway.url, "GET", "/v1/models").json()
    row = next(model for model in listing["data"] if model["id"] == CHEAP_OUT)
    assert row["owned_by"] == "openai"
    assert row["context_window"] == 128000
    assert row["pricing"] == {"input_per_mtok": 5.0, "output_per_mtok": 0.5}
    assert row["capabilities"] == ["json_schema", "tools"]


def test_sdk_lists_models(gateway: SidecarProcess) -> None:
    ids = {model.id for model in sdk(gateway).models.list()}
    assert {CHEAP_IN, "slot:chain"} <= ids
