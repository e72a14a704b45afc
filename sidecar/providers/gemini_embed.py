"""OpenAI embeddings request ↔ Google's embeddings APIs, pure translation: the gemini kind's
`batchEmbedContents` (Generative Language API) and the vertex kind's `:predict` (Vertex AI).

- gemini: `POST {root}/models/{model}:batchEmbedContents` with one request per text,
  `{model: "models/{model}", content: {parts: [{text}]}, taskType, outputDimensionality}`, at
  most 100 a call; the answer's `embeddings[].values` are the vectors in order. The API reports
  no token count: the input tokens are estimated, a token per 4 characters of each text.
- vertex: `POST {root}/publishers/google/models/{model}:predict` with `{instances: [{content,
  task_type}], parameters: {outputDimensionality}}`; the answer's `predictions[].embeddings`
  hold the vectors (`values`) and their tokens (`statistics.token_count`). gemini-* models
  (gemini-embedding-001) take one instance a call; the others (text-embedding-005,
  text-multilingual-embedding-002) 250 and at most 20,000 tokens, sent as calls of at most 250
  texts and 60,000 characters.
- both: `task_type` beside OpenAI's fields (`extra_body={"task_type": "RETRIEVAL_QUERY"}`) is
  sent as the task type, else none (the model's default); `dimensions` is the output
  dimensionality, and the vectors are then rescaled to unit length (Google normalizes only
  full-size gemini-embedding-001 vectors; OpenAI's shortened ones are unit vectors); token ids
  are refused (400 naming the provider); `encoding_format` and `user` are dropped.
"""

from __future__ import annotations

from typing import Any

import orjson

from sidecar.providers.base import Completion
from sidecar.providers.native_embeddings import (
    BatchLimit,
    answer,
    estimated_tokens,
    input_texts,
    option,
    requested_dimensions,
    token_count,
    unit,
    vectors_of,
)
from sidecar.providers.openai_compat import bad_body

GEMINI_API = "Gemini API"
VERTEX_API = "Vertex AI"
TASK_TYPES = (
    "RETRIEVAL_QUERY",
    "RETRIEVAL_DOCUMENT",
    "SEMANTIC_SIMILARITY",
    "CLASSIFICATION",
    "CLUSTERING",
    "QUESTION_ANSWERING",
    "FACT_VERIFICATION",
    "CODE_RETRIEVAL_QUERY",
)
GEMINI_BATCH = BatchLimit(100)  # requests per batchEmbedContents call
VERTEX_GEMINI_BATCH = BatchLimit(1)  # gemini-embedding-001 on :predict: one instance a call
VERTEX_BATCH = BatchLimit(250, chars=60_000)  # instances, and ≈ 15,000 of 20,000 tokens


def vertex_batch(model_id: str) -> BatchLimit:
    return VERTEX_GEMINI_BATCH if "gemini" in model_id.rsplit("/", 1)[-1] else VERTEX_BATCH


def batch_body(body: dict[str, Any], model_name: str, provider: str) -> dict[str, Any]:
    """The batchEmbedContents body; `model_name` is `models/{model}` (or a tuned model's)."""
    texts = input_texts(body, provider, GEMINI_API)
    task = option(body, "task_type", TASK_TYPES, provider, GEMINI_API)
    dimensions = requested_dimensions(body)
    requests = []
    for text in texts:
        request: dict[str, Any] = {"model": model_name, "content": {"parts": [{"text": text}]}}
        if task is not None:
            request["taskType"] = task
        if dimensions is not None:
            request["outputDimensionality"] = dimensions
        requests.append(request)
    return {"requests": requests}


def batch_answer(raw: bytes, call_body: dict[str, Any], model_id: str) -> Completion:
    data = _object(raw)
    texts = _texts(call_body)
    items = data.get("embeddings")
    if not isinstance(items, list):
        raise bad_body("no embeddings")
    values = [item.get("values") if isinstance(item, dict) else None for item in items]
    vectors = _shaped(vectors_of(values, len(texts)), call_body)
    return answer(vectors, model_id, estimated_tokens(texts))


def predict_body(body: dict[str, Any], provider: str) -> dict[str, Any]:
    """The Vertex AI `:predict` body of a text embedding model."""
    texts = input_texts(body, provider, VERTEX_API)
    task = option(body, "task_type", TASK_TYPES, provider, VERTEX_API)
    instances = [{"content": text, **({"task_type": task} if task else {})} for text in texts]
    out: dict[str, Any] = {"instances": instances}
    dimensions = requested_dimensions(body)
    if dimensions is not None:
        out["parameters"] = {"outputDimensionality": dimensions}
    return out


def predict_answer(raw: bytes, call_body: dict[str, Any], model_id: str) -> Completion:
    data = _object(raw)
    texts = _texts(call_body)
    predictions = data.get("predictions")
    if not isinstance(predictions, list):
        raise bad_body("no predictions")
    found = [_field(prediction, "embeddings") for prediction in predictions]
    vectors = _shaped(vectors_of([item.get("values") for item in found], len(texts)), call_body)
    counts = [token_count(_field(item, "statistics").get("token_count")) for item in found]
    known = [count for count in counts if count is not None]
    tokens = sum(known) if len(known) == len(counts) else estimated_tokens(texts)
    return answer(vectors, model_id, tokens)


def _field(value: Any, name: str) -> dict[str, Any]:
    """`value[name]` when both are objects, else an empty one."""
    found = value.get(name) if isinstance(value, dict) else None
    return found if isinstance(found, dict) else {}


def _object(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_body("not JSON") from None
    if not isinstance(data, dict):
        raise bad_body("not an object")
    return data


def _texts(call_body: dict[str, Any]) -> list[str]:
    given = call_body.get("input")
    return [given] if isinstance(given, str) else given if isinstance(given, list) else []


def _shaped(vectors: list[list[float]], call_body: dict[str, Any]) -> list[list[float]]:
    """Unit vectors when the client asked for a dimension (see the module's docstring)."""
    if requested_dimensions(call_body) is None:
        return vectors
    return [unit(vector) for vector in vectors]
