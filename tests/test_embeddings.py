"""POST /v1/embeddings (SPEC 2.6): the official SDK's `embeddings.create` (float and base64)
through a real sidecar, to an OpenAI-shaped fake and to the mock; refs, cascades, budgets
(input tokens × input price), usage records, metrics and errors as for chat."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from sidecar.api.embeddings import validate_embeddings_request
from sidecar.errors import GatewayError
from sidecar.providers.mock_embeddings import vector
from tests.conftest import PROVIDER_KEY, openai_config
from tests.openai_schemas import check_embeddings
from tests.procs import SidecarProcess
from tests.support import metric_samples, module_sidecar, request, sdk, without_circuit_breakers
from tests.upstreams.openai_fake import FakeOpenAI, Reply, fake_vector

SMALL = "fc:openai/text-embedding-3-small"
LARGE = "fc:openai/text-embedding-3-large"
ADMIN = "admin-token-for-embeddings"
KEY = "sk-embeddings-test"


def catalog() -> dict[str, Any]:
    return {
        SMALL: {"input_per_mtok": 0.02, "output_per_mtok": 0, "caps": ["embeddings"]},
        LARGE: {"input_per_mtok": 0.13, "output_per_mtok": 0, "caps": ["embeddings"]},
        "fc:openai/gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
        "fc:mock/embed": {"input_per_mtok": 0.01, "output_per_mtok": 0, "caps": ["embeddings"]},
    }


@pytest.fixture(scope="module")
def gateway(
    _openai_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    config = without_circuit_breakers(openai_config(_openai_server.url))
    config["providers"]["mock"] = {"kind": "mock"}
    config["models"] = catalog()
    config["slots"] = {"embed": [LARGE, SMALL]}
    config["customers"] = {"acme": {"budget": {"usd": 1.0, "period": "day"}}}
    config["admin"] = {"token": ADMIN}
    config["limits"] = {"max_body_bytes": 1_048_576}
    yield from module_sidecar(tmp_path_factory.mktemp("embeddings"), config)


def test_float_embeddings_through_the_sdk(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Reply(prompt_tokens=4))
    answer = sdk(gateway).embeddings.create(
        model=SMALL, input=["alpha", "beta"], encoding_format="float", dimensions=4
    )
    assert [item.index for item in answer.data] == [0, 1]
    assert answer.data[0].embedding == fake_vector("alpha", 4)
    assert answer.usage.prompt_tokens == 4
    sent = fake_openai.received[0]
    assert sent.path == "/v1/embeddings"
    assert sent.body == {
        "model": "text-embedding-3-small",
        "input": ["alpha", "beta"],
        "encoding_format": "float",
        "dimensions": 4,
    }
    assert sent.headers["Authorization"] == f"Bearer {PROVIDER_KEY}"  # never the client's


def test_base64_is_passed_to_a_kind_that_sends_it(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    """The SDK asks for base64 by default and decodes it: the vectors arrive intact."""
    answer = sdk(gateway).embeddings.create(model=SMALL, input="alpha", dimensions=3)
    assert fake_openai.received[0].body["encoding_format"] == "base64"
    assert answer.data[0].embedding == fake_vector("alpha", 3)


def test_base64_is_made_by_the_sidecar_for_the_mock(gateway: SidecarProcess) -> None:
    raw = request(
        gateway.url,
        "POST",
        "/v1/embeddings",
        {"model": "fc:mock/embed", "input": "alpha", "encoding_format": "base64", "dimensions": 6},
    )
    assert raw.status == 200
    packed = base64.b64decode(raw.json()["data"][0]["embedding"])
    values = struct.unpack("<6f", packed)
    expected = vector("alpha", "embed", 6)
    assert values == pytest.approx(expected, abs=1e-6)
    assert sum(v * v for v in values) == pytest.approx(1.0, abs=1e-5)


def test_the_mock_is_deterministic_and_distinct(gateway: SidecarProcess) -> None:
    client = sdk(gateway)
    first = client.embeddings.create(model="fc:mock/embed", input=["a", "b"], dimensions=16)
    again = client.embeddings.create(model="fc:mock/embed", input=["a", "b"], dimensions=16)
    assert [d.embedding for d in first.data] == [d.embedding for d in again.data]
    assert first.data[0].embedding != first.data[1].embedding
    tokens = client.embeddings.create(model="fc:mock/embed", input=[[1, 2, 3], [4]])
    assert len(tokens.data) == 2 and len(tokens.data[0].embedding) == 1536
    assert tokens.usage.prompt_tokens == 4


def test_a_cascade_escalates_and_says_so(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    fake_openai.on_model("text-embedding-3-large", Reply(status=503))
    raw = sdk(gateway).embeddings.with_raw_response.create(model="slot:embed", input="x")
    assert raw.headers["X-Ringside-Models-Tried"] == f"{LARGE},{SMALL}"
    assert raw.headers["X-Ringside-Model-Used"] == SMALL
    assert len(raw.parse().data) == 1


def test_match_picks_an_embedding_model(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    raw = sdk(gateway).embeddings.with_raw_response.create(
        model="match:caps=embeddings,provider=openai", input="x"
    )
    assert raw.headers["X-Ringside-Model-Used"] == SMALL  # the cheaper of the two


def test_a_kind_without_embeddings_is_a_clear_400(
    gateway: SidecarProcess, tmp_path: Path, _openai_server: FakeOpenAI
) -> None:
    from tests.support import start_sidecar

    config = openai_config(_openai_server.url)
    config["providers"]["claude"] = {"kind": "anthropic", "base_url": _openai_server.url}
    proc = start_sidecar(tmp_path, config).start()
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            sdk(proc).embeddings.create(model="fc:claude/claude-x", input="x")
    finally:
        proc.stop()
    assert "has no embeddings API" in caught.value.message
    assert caught.value.param == "model"


def test_cost_budget_and_usage_record(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    """Input tokens × input price, charged to the customer's budget and recorded."""
    fake_openai.script(Reply(prompt_tokens=50_000))
    raw = sdk(gateway).embeddings.with_raw_response.create(
        model=LARGE, input="some text", extra_headers={"FC-Customer": "acme"}
    )
    assert raw.headers["X-Ringside-Cost-USD"] == "0.0065"  # 50k × $0.13 / M
    remaining = float(raw.headers["X-Ringside-Budget-Remaining-USD"])
    assert remaining == pytest.approx(1.0 - 0.0065, abs=1e-9)
    usage = request(
        gateway.admin_url,
        "GET",
        "/v1/customers/acme/usage",
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert usage.status == 200
    assert usage.json()["spent_usd"] == pytest.approx(0.0065, abs=1e-9)
    assert usage.json()["tokens"]["input"] == 50_000
    assert usage.json()["tokens"]["output"] == 0
    samples = metric_samples(gateway)
    assert any(
        name == "ringside_cost_usd_total" and dict(labels).get("model") == LARGE and value > 0
        for (name, labels), value in samples.items()
    )


def test_no_output_cap_is_sent(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    """A budgeted chat gets max_completion_tokens; an embeddings request gets no such field
    (OpenAI refuses unknown parameters on /embeddings)."""
    sdk(gateway).embeddings.create(model=SMALL, input="x", extra_headers={"FC-Customer": "acme"})
    assert set(fake_openai.received[0].body) == {"model", "input", "encoding_format"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": SMALL}, "input"),
        ({"model": SMALL, "input": ""}, "input"),
        ({"model": SMALL, "input": []}, "input"),
        ({"model": SMALL, "input": ["a", 1]}, "input"),
        ({"model": SMALL, "input": [[1, -2]]}, "input"),
        ({"model": SMALL, "input": [True]}, "input"),
        ({"model": SMALL, "input": {"text": "x"}}, "input"),
        ({"model": SMALL, "input": ["x"] * 2049}, "input"),
        ({"model": SMALL, "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": SMALL, "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": SMALL, "input": "x", "dimensions": True}, "dimensions"),
        ({"model": SMALL, "input": "x", "user": 7}, "user"),
    ],
)
def test_malformed_requests_are_400_naming_the_parameter(body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as caught:
        validate_embeddings_request(body)
    assert caught.value.status == 400
    assert caught.value.param == param


def test_a_malformed_request_never_reaches_the_upstream(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    answer = request(gateway.url, "POST", "/v1/embeddings", {"model": SMALL, "input": [None]})
    assert answer.status == 400
    assert answer.error["param"] == "input"
    assert fake_openai.received == []


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"[" * 5000 + b"]" * 5000, 400, "invalid_request"),  # deep: refused before routing
        (
            b'{"model": "fc:mock/embed", "input": ' + b"[" * 70 + b"1" + b"]" * 70 + b"}",
            400,
            "invalid_request",
        ),  # nested past the depth limit inside an object
        (b'{"model": ["fc:mock/embed"], "input": {"$ref": "x"}}', 400, "invalid_request"),
        (b'{"model": 7, "input": "x"}', 400, "invalid_request"),
        (
            b'{"model": "fc:mock/embed", "input": "x", "dimensions": 1e400}',
            400,
            "invalid_request",
        ),  # orjson refuses a number past float range
        (
            b'{"model": "fc:mock/embed", "input": "' + b"x" * 1_100_000 + b'"}',
            413,
            "request_too_large",
        ),  # over limits.max_body_bytes (1 MiB here)
    ],
    ids=["deep array", "deep inside", "input object", "model number", "huge number", "huge"],
)
def test_hostile_bodies_get_a_clear_error_and_no_upstream_call(
    gateway: SidecarProcess, fake_openai: FakeOpenAI, raw: bytes, status: int, code: str
) -> None:
    answer = request(gateway.url, "POST", "/v1/embeddings", raw)
    assert answer.status == status
    assert answer.error["code"] == code
    assert fake_openai.received == []
    assert request(gateway.url, "POST", "/v1/embeddings",
                   {"model": "fc:mock/embed", "input": "ok"}).status == 200  # fmt: skip


def test_upstream_client_error_is_passed_through(
    gateway: SidecarProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(
        Reply(status=400, error_code="invalid_value", error_type="invalid_request_error")
    )
    with pytest.raises(openai.BadRequestError):
        sdk(gateway).embeddings.create(model=SMALL, input="x")


def test_the_mock_bounds_what_one_request_costs(gateway: SidecarProcess) -> None:
    answer = request(
        gateway.url,
        "POST",
        "/v1/embeddings",
        {"model": "fc:mock/embed", "input": ["x"] * 2048, "dimensions": 4096},
    )
    assert answer.status == 400
    assert "at most" in answer.error["message"]


def test_answers_match_openais_own_schema(gateway: SidecarProcess, fake_openai: FakeOpenAI) -> None:
    """CreateEmbeddingResponse of OpenAI's OpenAPI document (tests/openapi/embeddings.yaml): a
    passed-through float answer, the mock's, and a base64 answer the sidecar made, decoded."""
    for model, encoding in (
        (SMALL, "float"),
        ("fc:mock/embed", "float"),
        ("fc:mock/embed", "base64"),
    ):
        body = {"model": model, "input": ["a", "b"], "encoding_format": encoding, "dimensions": 4}
        answer = request(gateway.url, "POST", "/v1/embeddings", body)
        assert answer.status == 200
        data = answer.json()
        if encoding == "base64":
            for item in data["data"]:
                item["embedding"] = list(struct.unpack("<4f", base64.b64decode(item["embedding"])))
        check_embeddings(data)
    bad = {"object": "list", "data": [{"index": 0, "embedding": "x", "object": "embedding"}]}
    with pytest.raises(Exception, match="is not of type"):
        check_embeddings({**bad, "model": "m", "usage": {"prompt_tokens": 1, "total_tokens": 1}})


def test_vectors_are_stable_across_processes() -> None:
    """The mock's vectors come from SHAKE-256, not from the process's hash seed: this
    vector was computed once and must not change (a demo's stored embeddings stay valid)."""
    assert vector("stable", "embed", 4) == pytest.approx(
        [-0.17224812489, 0.74462919889, -0.64162396682, 0.06462681142], abs=1e-10
    )
    assert vector("stable", "embed", 4) != vector("stable", "other-model", 4)


# -- in process: the requests each embedding kind builds ---------------------------------------


def _settings(kind: str, **fields: Any) -> Any:
    from sidecar.settings.model import ProviderSettings

    return ProviderSettings(
        name=kind, kind=kind, **{"base_url": None, "api_key_env": None, **fields}
    )


def test_azure_embeds_on_its_deployment_and_v1_urls() -> None:
    from sidecar.providers.azure import AzureAdapter
    from sidecar.providers.base import UpstreamCall

    body = {"model": "fc:az/small", "input": "x", "encoding_format": "base64"}
    dated = _settings(
        "azure",
        base_url="https://res.openai.azure.com",
        api_key="k",
        api_version="2024-10-21",
        deployments={"small": "emb-prod"},
    )
    built = AzureAdapter(dated).build_embeddings_request(UpstreamCall(dated, "small", body))
    assert built.url == (
        "https://res.openai.azure.com/openai/deployments/emb-prod/embeddings?api-version=2024-10-21"
    )
    assert built.headers["api-key"] == "k"
    sent = json.loads(built.body)
    assert sent == {"model": "emb-prod", "input": "x", "encoding_format": "base64"}
    v1 = _settings("azure", base_url="https://res.openai.azure.com", api_key="k")
    built = AzureAdapter(v1).build_embeddings_request(UpstreamCall(v1, "small", body))
    assert built.url == "https://res.openai.azure.com/openai/v1/embeddings"
    assert json.loads(built.body)["model"] == "small"


@pytest.mark.parametrize(
    ("kind", "url", "base64_kept"),
    [
        ("openai", "https://api.openai.com/v1/embeddings", True),
        ("vllm", "http://127.0.0.1:8000/v1/embeddings", True),
        ("mistral", "https://api.mistral.ai/v1/embeddings", False),
        ("together", "https://api.together.xyz/v1/embeddings", False),
        ("fireworks", "https://api.fireworks.ai/inference/v1/embeddings", False),
        ("deepinfra", "https://api.deepinfra.com/v1/openai/embeddings", False),
        ("ollama", "http://127.0.0.1:11434/v1/embeddings", False),
    ],
)
def test_compatible_kinds_embed_under_their_base_url(
    kind: str, url: str, base64_kept: bool
) -> None:
    from sidecar.providers.base import UpstreamCall
    from sidecar.providers.openai_compat import COMPAT_KINDS, OpenAICompatAdapter

    settings = _settings(kind, api_key="k")
    adapter = OpenAICompatAdapter(settings, COMPAT_KINDS[kind])
    assert adapter.caps.embeddings
    body = {"model": "x", "input": ["a"], "encoding_format": "base64", "user": "u"}
    built = adapter.build_embeddings_request(UpstreamCall(settings, "emb", body))
    assert built.url == url
    sent = json.loads(built.body)
    assert sent["model"] == "emb"
    assert ("encoding_format" in sent) is base64_kept


def test_kinds_without_embeddings_say_so() -> None:
    from sidecar.providers.openai_compat import COMPAT_KINDS

    embedding = {k for k, row in COMPAT_KINDS.items() if row.caps.embeddings}
    assert embedding == {
        "openai",
        "vllm",
        "mistral",
        "together",
        "fireworks",
        "deepinfra",
        "ollama",
    }
