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
from sidecar.providers.cohere import CohereAdapter
from sidecar.settings.model import ProviderSettings
from tests.procs import SidecarProcess
from tests.support import module_sidecar, sdk, without_circuit_breakers
from tests.upstreams.cohere_fake import EmbedReply, FakeCohere, embed_problems, embed_vector

COHERE_KEY = "cohere-embed-test-key-0123456789"
COHERE_MODEL = "embed-v4.0"
COHERE_REF = f"fc:co/{COHERE_MODEL}"


def catalog() -> dict[str, Any]:
    return {
        COHERE_REF: {"input_per_mtok": 0.12, "output_per_mtok": 0, "caps": ["embeddings"]},
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
def sidecar(
    cohere_api: FakeCohere, tmp_path_factory: pytest.TempPathFactory
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
            "mock": {"kind": "mock"},
        },
        "models": catalog(),
        "slots": {"co_then_mock": [COHERE_REF, "fc:mock/embed"]},
    }
    env = {"CO_KEY": COHERE_KEY}
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
