"""POST /v1/embeddings on the kinds whose embeddings API is not OpenAI's: cohere (`/v2/embed`),
bedrock (InvokeModel with Titan Text Embeddings' and Cohere Embed's bodies, SigV4-signed) and
gemini / vertex (`batchEmbedContents`, `:predict`).

In process: the request each adapter builds (checked by its fake's validator) and the answer
it reads. End to end: the official `openai` SDK's `embeddings.create`, float and base64,
through a real sidecar against each kind's fake: what the fake received, the vectors, usage and
cost, batches split and joined in order, token-id input refused (and passed over by a cascade).
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from sidecar.errors import Outcome, UpstreamError
from sidecar.providers.base import UpstreamCall
from sidecar.providers.bedrock import BedrockAdapter
from sidecar.providers.cohere import CohereAdapter
from sidecar.providers.gemini import GeminiAdapter
from sidecar.providers.native_embeddings import BatchLimit, batches, unit
from sidecar.providers.vertex import VertexAdapter
from sidecar.settings.model import ProviderSettings
from tests.procs import SidecarProcess, wait_until
from tests.support import module_sidecar, request, sdk, without_circuit_breakers
from tests.upstreams.bedrock_fake import BedrockReply, FakeBedrock, invoke_problems, invoke_vector
from tests.upstreams.cohere_fake import EmbedReply, FakeCohere, embed_problems, embed_vector
from tests.upstreams.gemini_fake import (
    FakeGemini,
    Reply,
    batch_embed_problems,
    google_vector,
    predict_problems,
)
from tests.upstreams.google_token_fake import FakeTokenEndpoint, service_account_file

COHERE_KEY = "cohere-embed-test-key-0123456789"
COHERE_MODEL = "embed-v4.0"
COHERE_REF = f"fc:co/{COHERE_MODEL}"
TITAN = "amazon.titan-embed-text-v2:0"
TITAN_REF = f"fc:bed/{TITAN}"
BEDROCK_COHERE = "cohere.embed-v4:0"
BEDROCK_COHERE_REF = f"fc:bed/{BEDROCK_COHERE}"
GEMINI_KEY = "AIzaFakeGeminiEmbeddingsKey0123456789"
GEMINI_MODEL = "gemini-embedding-001"
GEMINI_REF = f"fc:gem/{GEMINI_MODEL}"
PROJECT, LOCATION = "embed-project", "us-central1"
VERTEX_GEMINI_REF = f"fc:vtx/{GEMINI_MODEL}"
VERTEX_TEXT_MODEL = "text-embedding-005"
VERTEX_TEXT_REF = f"fc:vtx/{VERTEX_TEXT_MODEL}"
CUSTOMER = "batched-co"
ADMIN = "admin-token-for-native-embeddings"
AWS_ACCESS_KEY = "AKIAFAKEEMBEDDINGS01"
AWS_SECRET_KEY = "fake-secret-access-key-for-the-embeddings-tests"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": AWS_ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": AWS_SECRET_KEY,
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def catalog() -> dict[str, Any]:
    return {
        COHERE_REF: {"input_per_mtok": 0.12, "output_per_mtok": 0, "caps": ["embeddings"]},
        TITAN_REF: {"input_per_mtok": 0.02, "output_per_mtok": 0, "caps": ["embeddings"]},
        BEDROCK_COHERE_REF: {"input_per_mtok": 0.12, "output_per_mtok": 0, "caps": ["embeddings"]},
        GEMINI_REF: {"input_per_mtok": 0.15, "output_per_mtok": 0, "caps": ["embeddings"]},
        VERTEX_GEMINI_REF: {"input_per_mtok": 0.15, "output_per_mtok": 0, "caps": ["embeddings"]},
        VERTEX_TEXT_REF: {"input_per_mtok": 0.1, "output_per_mtok": 0, "caps": ["embeddings"]},
        "fc:mock/embed": {"input_per_mtok": 0.01, "output_per_mtok": 0, "caps": ["embeddings"]},
    }


# -- in process: cohere ----------------------------------------------------------------------


def cohere_adapter(base_url: str | None = None) -> CohereAdapter:
    settings = ProviderSettings(
        name="co", kind="cohere", api_key_env="CO_KEY", api_key=COHERE_KEY, base_url=base_url
    )
    return CohereAdapter(settings)


def cohere_call(body: dict[str, Any]) -> UpstreamCall:
    return UpstreamCall(ProviderSettings("co", "cohere", None, None), COHERE_MODEL, body)


def cohere_sent(body: dict[str, Any]) -> dict[str, Any]:
    request = cohere_adapter().build_embeddings_request(cohere_call(body))
    sent: dict[str, Any] = json.loads(request.body)
    assert embed_problems(sent) == []
    return sent


def test_cohere_embeds_at_v2_embed_with_its_bearer_key() -> None:
    request = cohere_adapter().build_embeddings_request(cohere_call({"input": "x"}))
    assert request.url == "https://api.cohere.com/v2/embed"
    assert request.headers["Authorization"] == f"Bearer {COHERE_KEY}"
    own = cohere_adapter("https://cohere.internal/").build_embeddings_request(
        cohere_call({"input": "x"})
    )
    assert own.url == "https://cohere.internal/v2/embed"


def test_cohere_gets_texts_search_document_floats_and_the_dimension() -> None:
    sent = cohere_sent(
        {"model": COHERE_REF, "input": ["a", "b"], "dimensions": 256,
         "encoding_format": "base64", "user": "u1"}
    )  # fmt: skip
    assert sent == {
        "model": COHERE_MODEL,
        "texts": ["a", "b"],
        "input_type": "search_document",
        "embedding_types": ["float"],
        "output_dimension": 256,
    }


def test_cohere_takes_input_type_and_truncate_beside_openais_fields() -> None:
    sent = cohere_sent({"input": "q", "input_type": "search_query", "truncate": "NONE"})
    assert sent["input_type"] == "search_query"
    assert sent["truncate"] == "NONE"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [1, 2, 3]}, "input"),
        ({"input": [[1, 2], [3]]}, "input"),
        ({"input": "x", "input_type": "image"}, "input_type"),
        ({"input": "x", "truncate": "MIDDLE"}, "truncate"),
    ],
)
def test_cohere_refuses_what_its_embed_api_cannot_take(body: dict[str, Any], param: str) -> None:
    with pytest.raises(UpstreamError) as raised:
        cohere_adapter().build_embeddings_request(cohere_call(body))
    assert raised.value.outcome is Outcome.UNSUPPORTED  # a cascade moves on
    error = raised.value.client_error
    assert error is not None and error.status == 400 and error.param == param
    assert "'co'" in error.message and "Cohere Embed API" in error.message


def test_cohere_answer_becomes_an_openai_list_with_billed_tokens() -> None:
    body = json.dumps(
        {"id": "e1", "response_type": "embeddings_by_type",
         "embeddings": {"float": [[0.5, 0.25], [1.0, 0.0]]}, "texts": ["a", "b"],
         "meta": {"billed_units": {"input_tokens": 7}}}
    ).encode()  # fmt: skip
    done = cohere_adapter().parse_embeddings_response(body, cohere_call({"input": ["a", "b"]}), {})
    assert done.body["object"] == "list" and done.body["model"] == COHERE_MODEL
    assert [item["embedding"] for item in done.body["data"]] == [[0.5, 0.25], [1.0, 0.0]]
    assert [item["index"] for item in done.body["data"]] == [0, 1]
    assert done.usage is not None and done.usage.prompt_tokens == 7
    assert done.body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}


def test_cohere_answer_without_billed_units_is_estimated() -> None:
    body = json.dumps({"embeddings": {"float": [[0.5]]}}).encode()
    call = cohere_call({"input": "twelve chars"})
    done = cohere_adapter().parse_embeddings_response(body, call, {})
    assert done.usage is not None and done.usage.prompt_tokens == 3  # 12 characters / 4


def test_cohere_answer_with_too_few_vectors_is_a_bad_body() -> None:
    body = json.dumps({"embeddings": {"float": [[0.5]]}}).encode()
    with pytest.raises(UpstreamError) as raised:
        cohere_adapter().parse_embeddings_response(body, cohere_call({"input": ["a", "b"]}), {})
    assert raised.value.outcome is Outcome.UNAVAILABLE and raised.value.reason == "bad_body"


# -- in process: bedrock ---------------------------------------------------------------------


def bedrock_adapter() -> BedrockAdapter:
    return BedrockAdapter(ProviderSettings("bed", "bedrock", None, None, region="eu-west-1"))


def bedrock_sent(model: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    call = UpstreamCall(ProviderSettings("bed", "bedrock", None, None), model, body)
    request = bedrock_adapter().build_embeddings_request(call)
    sent: dict[str, Any] = json.loads(request.body)
    assert invoke_problems(sent, model) is None
    return request.url, sent


def test_titan_v2_is_invoked_with_its_own_body() -> None:
    url, sent = bedrock_sent(
        TITAN, {"input": ["a"], "dimensions": 256, "encoding_format": "base64"}
    )
    assert url == (
        "https://bedrock-runtime.eu-west-1.amazonaws.com/model/amazon.titan-embed-text-v2%3A0/invoke"
    )
    assert sent == {"inputText": "a", "dimensions": 256, "normalize": True}


def test_titan_takes_one_text_per_call() -> None:
    assert bedrock_adapter().embeddings_batch(TITAN) == BatchLimit(1)
    assert bedrock_adapter().embeddings_batch("us.cohere.embed-v4:0") == BatchLimit(96)


def test_titan_v1_refuses_dimensions() -> None:
    _url, sent = bedrock_sent("amazon.titan-embed-text-v1", {"input": "a"})
    assert sent == {"inputText": "a"}
    call = UpstreamCall(
        ProviderSettings("bed", "bedrock", None, None),
        "amazon.titan-embed-text-v1",
        {"input": "a", "dimensions": 256},
    )
    with pytest.raises(UpstreamError) as raised:
        bedrock_adapter().build_embeddings_request(call)
    assert raised.value.client_error is not None
    assert raised.value.client_error.param == "dimensions"


def test_cohere_on_bedrock_is_coheres_body_without_model() -> None:
    url, sent = bedrock_sent(
        "us.cohere.embed-v4:0", {"input": ["a", "b"], "dimensions": 512, "input_type": "clustering"}
    )
    assert url.endswith("/model/us.cohere.embed-v4%3A0/invoke")
    assert sent == {
        "texts": ["a", "b"],
        "input_type": "clustering",
        "embedding_types": ["float"],
        "output_dimension": 512,
    }


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (TITAN, {"input": [5, 6]}, "input"),
        (BEDROCK_COHERE, {"input": [[5, 6]]}, "input"),
        ("amazon.nova-2-multimodal-embeddings-v1:0", {"input": "x"}, "model"),
    ],
)
def test_bedrock_refuses_what_invoke_model_cannot_take(
    model: str, body: dict[str, Any], param: str
) -> None:
    call = UpstreamCall(ProviderSettings("bed", "bedrock", None, None), model, body)
    with pytest.raises(UpstreamError) as raised:
        bedrock_adapter().build_embeddings_request(call)
    assert raised.value.outcome is Outcome.UNSUPPORTED
    error = raised.value.client_error
    assert error is not None and error.param == param and "'bed'" in error.message


def test_titan_answer_tokens_from_the_body_cohere_from_the_header() -> None:
    settings = ProviderSettings("bed", "bedrock", None, None)
    titan = bedrock_adapter().parse_embeddings_response(
        b'{"embedding": [0.5, -0.5], "inputTextTokenCount": 3}',
        UpstreamCall(settings, TITAN, {"input": "abc"}),
        {},
    )
    assert titan.body["data"] == [{"object": "embedding", "index": 0, "embedding": [0.5, -0.5]}]
    assert titan.usage is not None and titan.usage.prompt_tokens == 3
    cohere = bedrock_adapter().parse_embeddings_response(
        b'{"id": "x", "embeddings": {"float": [[0.25]]}, "response_type": "embeddings_by_type"}',
        UpstreamCall(settings, BEDROCK_COHERE, {"input": ["abc"]}),
        {"X-Amzn-Bedrock-Input-Token-Count": "11"},
    )
    assert cohere.usage is not None and cohere.usage.prompt_tokens == 11
    floats = bedrock_adapter().parse_embeddings_response(
        b'{"embeddings": [[0.25]], "response_type": "embeddings_floats"}',
        UpstreamCall(settings, BEDROCK_COHERE, {"input": ["abcdefgh"]}),
        {},
    )
    assert floats.body["data"][0]["embedding"] == [0.25]
    assert floats.usage is not None and floats.usage.prompt_tokens == 2  # estimated


# -- in process: gemini and vertex -------------------------------------------------------------


def gemini_adapter() -> GeminiAdapter:
    settings = ProviderSettings(
        name="gem", kind="gemini", api_key_env="GEMINI_KEY", api_key=GEMINI_KEY, base_url=None
    )
    return GeminiAdapter(settings)


def vertex_adapter() -> VertexAdapter:
    settings = ProviderSettings(
        name="vtx", kind="vertex", api_key_env=None, base_url=None, project=PROJECT,
        location=LOCATION,
    )  # fmt: skip
    return VertexAdapter(settings)


def google_call(model: str, body: dict[str, Any]) -> UpstreamCall:
    return UpstreamCall(ProviderSettings("g", "gemini", None, None), model, body)


def test_gemini_embeds_with_batch_embed_contents() -> None:
    body = {"input": ["a", "b"], "dimensions": 8, "task_type": "RETRIEVAL_QUERY", "user": "u"}
    built = gemini_adapter().build_embeddings_request(google_call(GEMINI_MODEL, body))
    assert built.url == (
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-embedding-001"
        ":batchEmbedContents"
    )
    assert built.headers["x-goog-api-key"] == GEMINI_KEY
    assert batch_embed_problems(built.body, GEMINI_MODEL) == []
    assert json.loads(built.body) == {
        "requests": [
            {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": text}]},
             "taskType": "RETRIEVAL_QUERY", "outputDimensionality": 8}
            for text in ("a", "b")
        ]
    }  # fmt: skip


def test_gemini_answer_is_estimated_and_shortened_vectors_unit() -> None:
    raw = json.dumps({"embeddings": [{"values": [3.0, 4.0]}, {"values": [0.0, 2.0]}]}).encode()
    call = google_call(GEMINI_MODEL, {"input": ["12345678", "x"], "dimensions": 2})
    done = gemini_adapter().parse_embeddings_response(raw, call, {})
    assert [item["embedding"] for item in done.body["data"]] == [[0.6, 0.8], [0.0, 1.0]]
    assert done.usage is not None and done.usage.prompt_tokens == 2 + 1  # a token per 4 chars
    full = google_call(GEMINI_MODEL, {"input": ["x", "y"]})
    kept = gemini_adapter().parse_embeddings_response(raw, full, {})
    assert kept.body["data"][0]["embedding"] == [3.0, 4.0]  # full size: as Google sends it


def test_vertex_embeds_with_predict_on_the_publisher_model() -> None:
    body = {"input": ["a", "b"], "dimensions": 256, "task_type": "CLUSTERING"}
    built = vertex_adapter().build_embeddings_request(google_call(VERTEX_TEXT_MODEL, body))
    assert built.url == (
        f"https://us-central1-aiplatform.googleapis.com/v1/projects/{PROJECT}/locations/"
        f"{LOCATION}/publishers/google/models/text-embedding-005:predict"
    )
    assert "Authorization" not in built.headers  # set per call by the token hook
    assert predict_problems(built.body, VERTEX_TEXT_MODEL) == []
    assert json.loads(built.body) == {
        "instances": [
            {"content": "a", "task_type": "CLUSTERING"},
            {"content": "b", "task_type": "CLUSTERING"},
        ],
        "parameters": {"outputDimensionality": 256},
    }


def test_vertex_batches_gemini_models_one_text_a_call() -> None:
    assert vertex_adapter().embeddings_batch(GEMINI_MODEL) == BatchLimit(1)
    assert vertex_adapter().embeddings_batch(VERTEX_TEXT_MODEL) == BatchLimit(250, 60_000)
    assert gemini_adapter().embeddings_batch(GEMINI_MODEL) == BatchLimit(100)


def test_vertex_answer_tokens_from_the_statistics() -> None:
    raw = json.dumps(
        {"predictions": [
            {"embeddings": {"values": [1.0, 0.0], "statistics": {"token_count": 5.0,
                                                                 "truncated": False}}},
            {"embeddings": {"values": [0.0, 1.0], "statistics": {"token_count": 2}}},
        ], "metadata": {"billableCharacterCount": 20}}
    ).encode()  # fmt: skip
    call = google_call(VERTEX_TEXT_MODEL, {"input": ["a", "b"]})
    done = vertex_adapter().parse_embeddings_response(raw, call, {})
    assert done.usage is not None and done.usage.prompt_tokens == 7
    assert done.body["data"][1] == {"object": "embedding", "index": 1, "embedding": [0.0, 1.0]}


@pytest.mark.parametrize("adapter", [gemini_adapter, vertex_adapter])
@pytest.mark.parametrize(
    ("body", "param"),
    [({"input": [[1, 2]]}, "input"), ({"input": "x", "task_type": "retrieval"}, "task_type")],
)
def test_google_refuses_token_ids_and_unknown_task_types(
    adapter: Any, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(UpstreamError) as raised:
        adapter().build_embeddings_request(google_call(GEMINI_MODEL, body))
    assert raised.value.outcome is Outcome.UNSUPPORTED
    assert raised.value.client_error is not None and raised.value.client_error.param == param


# -- end to end: a sidecar, the openai SDK, the fakes -----------------------------------------


@pytest.fixture(scope="module")
def cohere_api() -> Iterator[FakeCohere]:
    fake = FakeCohere(COHERE_KEY)
    fake.server.start()
    yield fake
    fake.server.stop()


@pytest.fixture
def cohere(cohere_api: FakeCohere) -> Iterator[FakeCohere]:
    cohere_api.reset()
    yield cohere_api
    assert cohere_api.problems == []


@pytest.fixture(scope="module")
def bedrock_api() -> Iterator[FakeBedrock]:
    fake = FakeBedrock(AWS_ACCESS_KEY, AWS_SECRET_KEY, region="us-east-1")
    fake.server.start()
    yield fake
    fake.server.stop()


@pytest.fixture
def bedrock(bedrock_api: FakeBedrock) -> Iterator[FakeBedrock]:
    bedrock_api.reset()
    yield bedrock_api
    assert bedrock_api.problems == []


@pytest.fixture(scope="module")
def gemini_api() -> Iterator[FakeGemini]:
    fake = FakeGemini(GEMINI_KEY)
    fake.server.start()
    yield fake
    fake.server.stop()


@pytest.fixture
def gemini(gemini_api: FakeGemini) -> Iterator[FakeGemini]:
    gemini_api.reset()
    yield gemini_api
    assert gemini_api.problems() == []


@pytest.fixture(scope="module")
def google_tokens() -> set[str]:
    return set()


@pytest.fixture(scope="module")
def token_endpoint(google_tokens: set[str]) -> Iterator[FakeTokenEndpoint]:
    fake = FakeTokenEndpoint(google_tokens)
    fake.server.start()
    yield fake
    fake.server.stop()


@pytest.fixture(scope="module")
def vertex_api(google_tokens: set[str]) -> Iterator[FakeGemini]:
    fake = FakeGemini(vertex=(PROJECT, LOCATION), tokens=google_tokens)
    fake.server.start()
    yield fake
    fake.server.stop()


@pytest.fixture
def vertex(vertex_api: FakeGemini, token_endpoint: FakeTokenEndpoint) -> Iterator[FakeGemini]:
    vertex_api.reset()
    yield vertex_api
    assert vertex_api.problems() == []
    assert token_endpoint.problems() == []


@pytest.fixture(scope="module")
def sidecar(
    cohere_api: FakeCohere,
    bedrock_api: FakeBedrock,
    gemini_api: FakeGemini,
    vertex_api: FakeGemini,
    token_endpoint: FakeTokenEndpoint,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SidecarProcess]:
    timeout = {"connect": 2, "read": 5}
    config = {
        "storage": {"backend": "memory"},
        "providers": {
            "co": {
                "kind": "cohere",
                "base_url": cohere_api.url,
                "api_key_env": "CO_KEY",
                "timeout": timeout,
            },
            "bed": {
                "kind": "bedrock",
                "base_url": bedrock_api.url,
                "region": "us-east-1",
                "timeout": timeout,
            },
            "gem": {
                "kind": "gemini",
                "base_url": gemini_api.url,
                "api_key_env": "GEMINI_KEY",
                "timeout": timeout,
            },
            "vtx": {
                "kind": "vertex",
                "base_url": vertex_api.url,
                "project": PROJECT,
                "location": LOCATION,
                "timeout": timeout,
            },
            "mock": {"kind": "mock"},
        },
        "models": catalog(),
        "slots": {"co_then_mock": [COHERE_REF, "fc:mock/embed"]},
        "customers": {CUSTOMER: {"budget": {"usd": 1.0, "period": "day"}}},
        "admin": {"token": ADMIN},
    }
    workdir = tmp_path_factory.mktemp("embeddings-native")
    key_file: Path = service_account_file(workdir, token_endpoint)
    env = {
        "CO_KEY": COHERE_KEY,
        "GEMINI_KEY": GEMINI_KEY,
        "GOOGLE_APPLICATION_CREDENTIALS": str(key_file),
        "NO_PROXY": "127.0.0.1,localhost",
        **AWS_ENV,
    }
    yield from module_sidecar(workdir, without_circuit_breakers(config), env)


def test_cohere_float_embeddings_through_the_sdk(
    sidecar: SidecarProcess, cohere: FakeCohere
) -> None:
    raw = sdk(sidecar).embeddings.with_raw_response.create(
        model=COHERE_REF, input=["alpha", "beta"], encoding_format="float", dimensions=256
    )
    answer = raw.parse()
    assert [item.embedding for item in answer.data] == [
        embed_vector("alpha", 256),
        embed_vector("beta", 256),
    ]
    assert [item.index for item in answer.data] == [0, 1]
    assert answer.model == COHERE_MODEL
    assert answer.usage.prompt_tokens == 3  # billed: 2 + 1
    assert raw.headers["X-Ringside-Cost-USD"] == "0.00000036"  # 3 × $0.12 / M
    (seen,) = cohere.received
    assert seen.path == "/v2/embed"
    assert seen.headers["Authorization"] == f"Bearer {COHERE_KEY}"
    assert seen.body == {
        "model": COHERE_MODEL,
        "texts": ["alpha", "beta"],
        "input_type": "search_document",
        "embedding_types": ["float"],
        "output_dimension": 256,
    }


def test_cohere_base64_is_made_by_the_sidecar(sidecar: SidecarProcess, cohere: FakeCohere) -> None:
    """The SDK asks for base64 by default and decodes it: the vectors arrive intact."""
    answer = sdk(sidecar).embeddings.create(model=COHERE_REF, input="alpha")
    assert answer.data[0].embedding == embed_vector("alpha")
    assert cohere.received[0].body["embedding_types"] == ["float"]


def test_cohere_input_type_from_extra_body(sidecar: SidecarProcess, cohere: FakeCohere) -> None:
    sdk(sidecar).embeddings.create(
        model=COHERE_REF, input="what is ringside?", extra_body={"input_type": "search_query"}
    )
    assert cohere.received[0].body["input_type"] == "search_query"


def test_cohere_more_texts_than_a_call_takes_are_batched_in_order(
    sidecar: SidecarProcess, cohere: FakeCohere
) -> None:
    texts = [f"text number {i}" for i in range(200)]
    answer = sdk(sidecar).embeddings.create(model=COHERE_REF, input=texts, encoding_format="float")
    assert sorted(len(seen.body["texts"]) for seen in cohere.received) == [8, 96, 96]
    sent = [text for seen in cohere.received for text in seen.body["texts"]]
    assert sorted(sent) == sorted(texts)  # the calls run side by side: any order
    assert [item.index for item in answer.data] == list(range(200))
    assert [item.embedding for item in answer.data] == [embed_vector(text) for text in texts]
    assert answer.usage.prompt_tokens == sum(-(-len(text) // 4) for text in texts)


def test_cohere_a_failed_batch_fails_the_request(
    sidecar: SidecarProcess, cohere: FakeCohere
) -> None:
    cohere.script_embed(EmbedReply(status=400, message="invalid request: texts too long"))
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(sidecar).embeddings.create(model=COHERE_REF, input=["x"] * 100)
    assert "texts too long" in caught.value.message


def test_cohere_batches_answered_before_another_failed_are_charged(
    sidecar: SidecarProcess, cohere: FakeCohere
) -> None:
    """Cohere bills every call that answered: when one batch of a request fails after the
    others answered, the request fails, and the answered batches' tokens are still charged to
    the customer's budget and on the request's usage record."""
    texts = [f"batched text {i}" for i in range(200)]  # calls of 96, 96 and 8 texts
    failing = EmbedReply(status=400, message="invalid request: too long", delay=0.5,
                         for_text="batched text 199")  # fmt: skip
    cohere.script_embed(failing)  # the last call fails, after the others answered
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(sidecar).embeddings.create(
            model=COHERE_REF, input=texts, extra_headers={"FC-Customer": CUSTOMER}
        )
    assert "too long" in caught.value.message
    mine = [seen for seen in cohere.received if seen.body["texts"][0].startswith("batched")]
    answered = [seen for seen in mine if "batched text 199" not in seen.body["texts"]]
    assert len(mine) == 3 and len(answered) == 2
    billed = sum(-(-len(text) // 4) for seen in answered for text in seen.body["texts"])

    def report() -> dict[str, Any]:
        answer = request(
            sidecar.admin_url, "GET", f"/v1/customers/{CUSTOMER}/usage",
            headers={"Authorization": f"Bearer {ADMIN}"},
        )  # fmt: skip
        assert answer.status == 200, answer.body
        data: dict[str, Any] = answer.json()
        return data

    usage = wait_until(lambda: (found := report())["requests"] == 1 and found, 10)
    assert usage["tokens"]["input"] == billed > 0
    assert usage["spent_usd"] == pytest.approx(billed * 0.12 / 1e6, abs=1e-12)


def test_cohere_refuses_token_ids_with_a_400_naming_it(
    sidecar: SidecarProcess, cohere: FakeCohere
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(sidecar).embeddings.create(model=COHERE_REF, input=[[1, 2, 3]])
    assert "'co'" in caught.value.message and "token ids" in caught.value.message
    assert caught.value.param == "input"
    assert cohere.received == []


def test_a_cascade_passes_token_ids_on_from_cohere(
    sidecar: SidecarProcess, cohere: FakeCohere
) -> None:
    raw = sdk(sidecar).embeddings.with_raw_response.create(
        model="slot:co_then_mock", input=[[1, 2, 3]]
    )
    assert raw.headers["X-Ringside-Model-Used"] == "fc:mock/embed"
    assert len(raw.parse().data) == 1
    assert cohere.received == []


def test_titan_float_embeddings_one_signed_call_per_input(
    sidecar: SidecarProcess, bedrock: FakeBedrock
) -> None:
    raw = sdk(sidecar).embeddings.with_raw_response.create(
        model=TITAN_REF, input=["alpha", "beta", "gamma"], encoding_format="float", dimensions=256
    )
    answer = raw.parse()
    assert [item.embedding for item in answer.data] == [
        invoke_vector(text, 256) for text in ("alpha", "beta", "gamma")
    ]
    assert [item.index for item in answer.data] == [0, 1, 2]
    assert answer.usage.prompt_tokens == 2 + 1 + 2  # inputTextTokenCount of each call
    assert raw.headers["X-Ringside-Cost-USD"] == "0.0000001"  # 5 × $0.02 / M
    assert sorted(seen["body"]["inputText"] for seen in bedrock.requests) == [
        "alpha", "beta", "gamma"
    ]  # fmt: skip
    for seen in bedrock.requests:  # each signed (the fake checked the signature)
        assert seen["op"] == "invoke" and seen["model"] == TITAN
        assert seen["headers"]["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=")
        assert seen["body"]["dimensions"] == 256 and seen["body"]["normalize"] is True


def test_titan_base64_is_made_by_the_sidecar(sidecar: SidecarProcess, bedrock: FakeBedrock) -> None:
    answer = sdk(sidecar).embeddings.create(model=TITAN_REF, input="alpha")
    assert answer.data[0].embedding == invoke_vector("alpha", 1024)
    assert answer.usage.prompt_tokens == 2


def test_cohere_on_bedrock_float_and_base64(sidecar: SidecarProcess, bedrock: FakeBedrock) -> None:
    client = sdk(sidecar)
    floats = client.embeddings.create(
        model=BEDROCK_COHERE_REF, input=["alpha", "beta"], encoding_format="float", dimensions=256
    )
    assert [item.embedding for item in floats.data] == [
        invoke_vector("alpha", 256), invoke_vector("beta", 256)
    ]  # fmt: skip
    assert floats.usage.prompt_tokens == 3  # the X-Amzn-Bedrock-Input-Token-Count header
    packed = client.embeddings.create(model=BEDROCK_COHERE_REF, input="alpha")
    assert packed.data[0].embedding == invoke_vector("alpha", 1536)
    first = bedrock.requests[0]
    assert first["model"] == BEDROCK_COHERE and first["op"] == "invoke"
    assert first["body"] == {
        "texts": ["alpha", "beta"],
        "input_type": "search_document",
        "embedding_types": ["float"],
        "output_dimension": 256,
    }


def test_bedrock_refuses_token_ids(sidecar: SidecarProcess, bedrock: FakeBedrock) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(sidecar).embeddings.create(model=TITAN_REF, input=[1, 2, 3])
    assert "'bed'" in caught.value.message and caught.value.param == "input"
    assert bedrock.requests == []


def test_bedrock_validation_error_is_the_clients(
    sidecar: SidecarProcess, bedrock: FakeBedrock
) -> None:
    bedrock.script(
        BedrockReply(status=400, error_type="ValidationException", message="bad dimensions")
    )
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(sidecar).embeddings.create(model=TITAN_REF, input="x")
    assert "bad dimensions" in caught.value.message


# -- batches -----------------------------------------------------------------------------------


def test_batches_hold_at_most_the_inputs_and_characters_a_call_takes() -> None:
    body = {"model": "m", "input": ["aaaa", "bb", "cccccc", "d", "eeeeeeeeeeee"]}
    split = [part["input"] for part in batches(body, BatchLimit(2, chars=8))]
    assert split == [["aaaa", "bb"], ["cccccc", "d"], ["eeeeeeeeeeee"]]  # too long: alone
    assert batches(body, BatchLimit(5)) == [body]
    assert [part["input"] for part in batches(body, BatchLimit(3))] == [
        ["aaaa", "bb", "cccccc"], ["d", "eeeeeeeeeeee"]
    ]  # fmt: skip
    tokens = {"input": [[1, 2], [3]]}
    assert batches(tokens, BatchLimit(1)) == [tokens]  # refused by the adapter, unsplit


# -- end to end: gemini and vertex ------------------------------------------------------------


def test_gemini_float_embeddings_through_the_sdk(
    sidecar: SidecarProcess, gemini: FakeGemini
) -> None:
    raw = sdk(sidecar).embeddings.with_raw_response.create(
        model=GEMINI_REF, input=["alpha", "beta"], encoding_format="float", dimensions=16
    )
    answer = raw.parse()
    assert [item.embedding for item in answer.data] == [
        unit(google_vector("alpha", 16)), unit(google_vector("beta", 16))
    ]  # fmt: skip
    assert answer.usage.prompt_tokens == 2 + 1  # estimated: a token per 4 characters
    assert raw.headers["X-Ringside-Cost-USD"] == "0.00000045"  # 3 × $0.15 / M
    (seen,) = gemini.received
    assert seen.method == "batchEmbedContents" and seen.model == GEMINI_MODEL
    assert seen.headers["x-goog-api-key"] == GEMINI_KEY
    assert [r["outputDimensionality"] for r in seen.body["requests"]] == [16, 16]


def test_gemini_base64_full_size(sidecar: SidecarProcess, gemini: FakeGemini) -> None:
    answer = sdk(sidecar).embeddings.create(model=GEMINI_REF, input="alpha")
    assert answer.data[0].embedding == google_vector("alpha", 3072)  # float32-exact eighths


def test_gemini_batches_of_100(sidecar: SidecarProcess, gemini: FakeGemini) -> None:
    texts = [f"passage {i}" for i in range(150)]
    answer = sdk(sidecar).embeddings.create(model=GEMINI_REF, input=texts, dimensions=4)
    assert sorted(len(seen.body["requests"]) for seen in gemini.received) == [50, 100]
    assert [item.index for item in answer.data] == list(range(150))
    for item, text in zip(answer.data, texts, strict=True):
        assert item.embedding == pytest.approx(unit(google_vector(text, 4)), abs=1e-6)


def test_gemini_quota_error_escalates_as_a_429(sidecar: SidecarProcess, gemini: FakeGemini) -> None:
    gemini.script(Reply(status=429, error_status="RESOURCE_EXHAUSTED", error_message="quota"))
    answer = request(sidecar.url, "POST", "/v1/embeddings", {"model": GEMINI_REF, "input": "x"})
    assert answer.status == 503  # escalated from, as for chat: no candidate left
    assert "quota" in answer.error["message"]


def test_vertex_gemini_model_one_call_per_text_with_token_counts(
    sidecar: SidecarProcess, vertex: FakeGemini
) -> None:
    raw = sdk(sidecar).embeddings.with_raw_response.create(
        model=VERTEX_GEMINI_REF, input=["alpha", "beta", "gamma"], encoding_format="float"
    )
    answer = raw.parse()
    assert [item.embedding for item in answer.data] == [
        google_vector(text, 3072) for text in ("alpha", "beta", "gamma")
    ]
    assert answer.usage.prompt_tokens == 2 + 1 + 2  # statistics.token_count of each
    assert len(vertex.received) == 3
    for seen in vertex.received:
        assert seen.method == "predict" and seen.model == GEMINI_MODEL
        assert seen.headers["Authorization"].startswith("Bearer ")
        assert len(seen.body["instances"]) == 1


def test_vertex_text_model_base64_in_one_call(sidecar: SidecarProcess, vertex: FakeGemini) -> None:
    answer = sdk(sidecar).embeddings.create(
        model=VERTEX_TEXT_REF, input=["alpha", "beta"], dimensions=64
    )
    for item, text in zip(answer.data, ("alpha", "beta"), strict=True):
        assert item.embedding == pytest.approx(unit(google_vector(text, 64)), abs=1e-6)
    (seen,) = vertex.received
    assert seen.body == {
        "instances": [{"content": "alpha"}, {"content": "beta"}],
        "parameters": {"outputDimensionality": 64},
    }


def test_vertex_base64_is_little_endian_float32(
    sidecar: SidecarProcess, vertex: FakeGemini
) -> None:
    answer = request(
        sidecar.url, "POST", "/v1/embeddings",
        {"model": VERTEX_TEXT_REF, "input": "alpha", "encoding_format": "base64"},
    )  # fmt: skip
    assert answer.status == 200
    packed = base64.b64decode(answer.json()["data"][0]["embedding"])
    assert list(struct.unpack("<768f", packed)) == google_vector("alpha", 768)


def test_google_kinds_refuse_token_ids(
    sidecar: SidecarProcess, gemini: FakeGemini, vertex: FakeGemini
) -> None:
    for ref, name in ((GEMINI_REF, "'gem'"), (VERTEX_TEXT_REF, "'vtx'")):
        with pytest.raises(openai.BadRequestError) as caught:
            sdk(sidecar).embeddings.create(model=ref, input=[[1, 2, 3]])
        assert name in caught.value.message and caught.value.param == "input"
    assert gemini.received == [] and vertex.received == []
