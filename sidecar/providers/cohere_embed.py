"""OpenAI embeddings request ↔ Cohere Embed (v2 `/v2/embed`, and Cohere Embed on Bedrock,
whose body is the same without `model`), pure translation.

- `input` (a string or strings) → `texts`; token ids are refused (400 naming the provider);
- `input_type`, which Cohere requires and OpenAI has no field for, is `search_document` (what
  an application embeds most: the documents of its index) unless the request names another
  beside OpenAI's fields (`extra_body={"input_type": "search_query"}` in the OpenAI SDK):
  search_document, search_query, classification or clustering;
- `truncate` (NONE, START, END) likewise, when the request names it; Cohere's default is END;
- `dimensions` → `output_dimension` (Embed v4 takes 256, 512, 1024 or 1536; older models
  refuse it, and Cohere's 400 says so);
- `embedding_types: ["float"]` always: the endpoint encodes base64 itself when asked;
- `encoding_format` and `user` are dropped.
The answer's `embeddings.float` is the vectors in input order (an older answer, `embeddings`
as a plain list, too); the input tokens are `meta.billed_units.input_tokens`, else estimated.
"""

from __future__ import annotations

from typing import Any

import orjson

from sidecar.providers.base import Completion
from sidecar.providers.native_embeddings import (
    answer,
    estimated_tokens,
    input_texts,
    option,
    requested_dimensions,
    token_count,
    vectors_of,
)
from sidecar.providers.openai_compat import bad_body

INPUT_TYPES = ("search_document", "search_query", "classification", "clustering")
DEFAULT_INPUT_TYPE = "search_document"
TRUNCATE = ("NONE", "START", "END")
BATCH = 96  # texts per call, Cohere's limit (on Bedrock too)


def embed_body(body: dict[str, Any], provider: str, api: str) -> dict[str, Any]:
    """The Cohere Embed body, without `model`, for an OpenAI embeddings body."""
    texts = input_texts(body, provider, api)
    out: dict[str, Any] = {
        "texts": texts,
        "input_type": option(body, "input_type", INPUT_TYPES, provider, api) or DEFAULT_INPUT_TYPE,
        "embedding_types": ["float"],
    }
    truncate = option(body, "truncate", TRUNCATE, provider, api)
    if truncate is not None:
        out["truncate"] = truncate
    dimensions = requested_dimensions(body)
    if dimensions is not None:
        out["output_dimension"] = dimensions
    return out


def embed_answer(body: bytes, model: str, call_body: dict[str, Any], tokens: Any) -> Completion:
    """The OpenAI answer of a Cohere Embed answer; `tokens` is the input tokens the provider
    reported elsewhere (Bedrock's header), used when the body has none."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_body("not JSON") from None
    if not isinstance(data, dict):
        raise bad_body("not an object")
    texts = call_body.get("input")
    texts = [texts] if isinstance(texts, str) else texts if isinstance(texts, list) else []
    embeddings = data.get("embeddings")
    if isinstance(embeddings, dict):  # embeddings_by_type
        embeddings = embeddings.get("float")
    vectors = vectors_of(embeddings, len(texts))
    meta = data.get("meta")
    billed = meta.get("billed_units") if isinstance(meta, dict) else None
    reported = token_count(billed.get("input_tokens")) if isinstance(billed, dict) else None
    if reported is None:
        reported = token_count(tokens)
    return answer(vectors, model, reported if reported is not None else estimated_tokens(texts))
