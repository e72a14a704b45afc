"""Embeddings from the mock provider: a deterministic unit vector per input, so a demo or a
test of a retrieval app gets stable, distinct vectors with no model and no network."""

from __future__ import annotations

import hashlib
import math
from array import array
from typing import Any

from sidecar.providers.base import Usage

DEFAULT_DIMENSIONS = 1536  # text-embedding-3-small's
MAX_DIMENSIONS = 4096
MAX_VALUES = 1 << 20  # per request (~0.3 s of event loop): more is the client's 400


class TooManyValues(ValueError):
    pass


def vector(text: str, model: str, dimensions: int) -> list[float]:
    """A unit vector drawn from SHAKE-256 of the model and the input: stable across runs."""
    seed = hashlib.blake2b(f"{model}\0{text}".encode("utf-8", "surrogatepass")).digest()
    words = array("I")
    words.frombytes(hashlib.shake_256(seed).digest(4 * dimensions))
    raw = [w / 2147483647.5 - 1.0 for w in words]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def _inputs(value: Any) -> list[tuple[str, int]]:
    """Each input as (the text the vector is drawn from, its tokens)."""
    if isinstance(value, str):
        return [(value, max(1, (len(value) + 3) // 4))]
    if isinstance(value, list) and value and isinstance(value[0], int):
        return [(",".join(map(str, value)), len(value))]
    out: list[tuple[str, int]] = []
    for item in value if isinstance(value, list) else ():
        if isinstance(item, str):
            out.append((item, max(1, (len(item) + 3) // 4)))
        elif isinstance(item, list):
            out.append((",".join(map(str, item)), len(item)))
    return out


def embeddings_answer(body: dict[str, Any], model: str) -> tuple[dict[str, Any], Usage]:
    """An OpenAI `list` of `embedding` objects for the request `body` (float vectors: the
    endpoint encodes base64 when asked)."""
    dimensions = body.get("dimensions")
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
        dimensions = DEFAULT_DIMENSIONS
    dimensions = min(dimensions, MAX_DIMENSIONS)
    inputs = _inputs(body.get("input"))
    if len(inputs) * dimensions > MAX_VALUES:
        raise TooManyValues(
            f"the mock provider answers at most {MAX_VALUES} vector values per request "
            f"({len(inputs)} inputs x {dimensions} dimensions asked): send fewer inputs or "
            "dimensions"
        )
    tokens = sum(count for _text, count in inputs)
    data = [
        {"object": "embedding", "index": index, "embedding": vector(text, model, dimensions)}
        for index, (text, _count) in enumerate(inputs)
    ]
    usage = Usage(tokens, 0)
    answer = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return answer, usage
