"""POST /v1/embeddings on the kinds whose embeddings API is not OpenAI's: cohere (`/v2/embed`),
bedrock (InvokeModel with Titan Text Embeddings' and Cohere Embed's bodies, SigV4-signed) and
gemini / vertex (`batchEmbedContents`, `:predict`).

In process: the request each adapter builds (checked by its fake's validator) and the answer
it reads. End to end: the official `openai` SDK's `embeddings.create`, float and base64,
through a real sidecar against each kind's fake: what the fake received, the vectors, usage and
cost, batches split and joined in order, token-id input refused (and passed over by a cascade).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from sidecar.errors import Outcome, UpstreamError
from sidecar.providers.base import UpstreamCall
from sidecar.providers.bedrock import BedrockAdapter
from sidecar.providers.cohere import CohereAdapter
from sidecar.settings.model import ProviderSettings
from tests.procs import SidecarProcess
from tests.support import module_sidecar, sdk, without_circuit_breakers
from tests.upstreams.bedrock_fake import BedrockReply, FakeBedrock, invoke_problems, invoke_vector
from tests.upstreams.cohere_fake import EmbedReply, FakeCohere, embed_problems, embed_vector

COHERE_KEY = "cohere-embed-test-key-0123456789"
COHERE_MODEL = "embed-v4.0"
COHERE_REF = f"fc:co/{COHERE_MODEL}"
TITAN = "amazon.titan-embed-text-v2:0"
TITAN_REF = f"fc:bed/{TITAN}"
BEDROCK_COHERE = "cohere.embed-v4:0"
BEDROCK_COHERE_REF = f"fc:bed/{BEDROCK_COHERE}"
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
    assert bedrock_adapter().embeddings_batch(TITAN) == 1
    assert bedrock_adapter().embeddings_batch("us.cohere.embed-v4:0") == 96


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
def sidecar(
    cohere_api: FakeCohere, bedrock_api: FakeBedrock, tmp_path_factory: pytest.TempPathFactory
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
            "mock": {"kind": "mock"},
        },
        "models": catalog(),
        "slots": {"co_then_mock": [COHERE_REF, "fc:mock/embed"]},
    }
    env = {"CO_KEY": COHERE_KEY, **AWS_ENV}
    workdir = tmp_path_factory.mktemp("embeddings-native")
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
