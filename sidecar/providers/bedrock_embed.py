"""OpenAI embeddings request ↔ Amazon Bedrock InvokeModel (`POST /model/{modelId}/invoke`),
pure translation. Converse has no embeddings: each model family takes its own body, and the
family is read from the model id (a foundation model id, or an inference profile id such as
`us.cohere.embed-v4:0`):

- Amazon Titan Text Embeddings (`amazon.titan-embed-text-v2:0`): `{inputText, dimensions,
  normalize: true}` (unit vectors, as OpenAI's); one text per call, so a request of several
  inputs is sent as one call per input (see native_embeddings) and answered in order; the
  tokens are the answer's `inputTextTokenCount`. v1 (`amazon.titan-embed-text-v1`,
  `amazon.titan-embed-g1-text-02`) takes `inputText` only: `dimensions` there is a 400.
- Cohere Embed (`cohere.embed-v4:0`, `cohere.embed-english-v3`, …): Cohere's own body without
  `model` (cohere_embed: `texts`, `input_type`, `embedding_types`, `output_dimension`), up to
  96 texts per call; the tokens are the `X-Amzn-Bedrock-Input-Token-Count` header.
- any other model id (Nova multimodal embeddings, TwelveLabs, …) is a 400 naming the provider.
Token-id inputs are refused for every family (they take text only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from sidecar.errors import UpstreamError
from sidecar.providers.base import Completion
from sidecar.providers.cohere_embed import BATCH as COHERE_BATCH
from sidecar.providers.cohere_embed import embed_answer, embed_body
from sidecar.providers.native_embeddings import (
    BatchLimit,
    answer,
    estimated_tokens,
    input_texts,
    refused,
    requested_dimensions,
    token_count,
    vectors_of,
)
from sidecar.providers.openai_compat import bad_body

API = "Bedrock InvokeModel"
TITAN_V1_IDS = ("amazon.titan-embed-text-v1", "amazon.titan-embed-g1-text")
TITAN_V2_ID = "amazon.titan-embed-text-v2"
COHERE_ID = "cohere.embed-"
TOKEN_HEADER = "x-amzn-bedrock-input-token-count"


def family(model_id: str) -> str | None:
    """`titan-v1`, `titan-v2` or `cohere` for a model id of a family translated here."""
    lowered = model_id.lower()
    if any(name in lowered for name in TITAN_V1_IDS):
        return "titan-v1"
    if TITAN_V2_ID in lowered:
        return "titan-v2"
    if COHERE_ID in lowered:
        return "cohere"
    return None


def batch_size(model_id: str) -> BatchLimit:
    """Inputs per InvokeModel call: one for Titan, Cohere's 96."""
    return BatchLimit(COHERE_BATCH if family(model_id) == "cohere" else 1)


def invoke_body(body: dict[str, Any], model_id: str, provider: str) -> dict[str, Any]:
    """The InvokeModel body of the model's family for an OpenAI embeddings body (a Titan
    body is built of the first text: the request is split one text per call before this)."""
    kind = family(model_id)
    if kind is None:
        raise _unknown_family(model_id, provider)
    if kind == "cohere":
        return embed_body(body, provider, API)
    texts = input_texts(body, provider, API)
    if len(texts) != 1:  # HttpProvider.embed splits by batch_size: never more here
        raise ValueError(f"Titan embeds one text per call, not {len(texts)}")
    out: dict[str, Any] = {"inputText": texts[0]}
    dimensions = requested_dimensions(body)
    if kind == "titan-v2":
        if dimensions is not None:
            out["dimensions"] = dimensions
        out["normalize"] = True
    elif dimensions is not None:
        raise refused(
            provider, API, f"model {model_id!r} (Titan Text Embeddings v1) has one size "
            "(1536): dimensions cannot be sent; leave it out, or use "
            "amazon.titan-embed-text-v2:0 (256, 512 or 1024)", "dimensions",
        )  # fmt: skip
    return out


def invoke_answer(
    body: bytes, call_body: dict[str, Any], model_id: str, headers: Mapping[str, str]
) -> Completion:
    """The OpenAI answer of an InvokeModel embeddings answer."""
    header = next((v for k, v in headers.items() if k.lower() == TOKEN_HEADER), None)
    if family(model_id) == "cohere":
        return embed_answer(body, model_id, call_body, header)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_body("not JSON") from None
    if not isinstance(data, dict):
        raise bad_body("not an object")
    vectors = vectors_of([data.get("embedding")], 1)
    tokens = token_count(data.get("inputTextTokenCount"))
    if tokens is None:
        tokens = token_count(header)
    if tokens is None:
        given = call_body.get("input")
        tokens = estimated_tokens(given if isinstance(given, list) else [str(given)])
    return answer(vectors, model_id, tokens)


def _unknown_family(model_id: str, provider: str) -> UpstreamError:
    return refused(
        provider, API, f"has no embeddings translation for model {model_id!r}: embeddings "
        "on Bedrock are sent for Amazon Titan Text Embeddings (amazon.titan-embed-text-*) and "
        "Cohere Embed (cohere.embed-*) models", "model",
    )  # fmt: skip
