"""What the embeddings adapters of kinds whose API is not OpenAI's share (cohere, bedrock,
gemini, vertex): the client's input as texts, the answer as an OpenAI `list` of `embedding`
objects, and the split of one request into the calls such an API takes.

These APIs take text only: OpenAI's token-id inputs (arrays of integers, which only OpenAI's
own tokenizer can read back) are refused with a 400 naming the provider; that refusal is an
UNSUPPORTED outcome, so a cascade moves on to a candidate that takes them. An API that takes
fewer inputs per call than OpenAI's 2048 (or fewer tokens per call than a request may hold) has
an `embeddings_batch(model_id) -> BatchLimit` method on its adapter: `HttpProvider.embed` sends
the request as calls within that limit (`batches`) and joins their answers (`joined`), in order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.errors import GatewayError, Outcome, UpstreamError
from sidecar.providers.base import MAX_TOKENS, Completion, Usage
from sidecar.providers.openai_compat import bad_body


@dataclass(frozen=True, slots=True)
class BatchLimit:
    """What one call of an embeddings API takes: at most `inputs` texts, and at most `chars`
    characters of text in all (for an API that bounds the tokens of a call; a text longer
    than that goes alone)."""

    inputs: int
    chars: int | None = None


def refused(provider: str, api: str, message: str, param: str) -> UpstreamError:
    """A request this provider's embeddings API cannot take: a 400 naming the provider and the
    parameter, and a candidate a cascade passes over (as a kind without embeddings)."""
    text = f"provider {provider!r} ({api}) {message}"
    error = GatewayError(400, "invalid_request", text, param=param)
    return UpstreamError(
        Outcome.UNSUPPORTED, text, status=400, reason="unsupported", client_error=error
    )


def input_texts(body: dict[str, Any], provider: str, api: str) -> list[str]:
    """The request's `input` as a list of texts (validated by the endpoint already)."""
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise refused(
        provider, api, "embeds text only: input as token ids (arrays of integers) cannot be "
        "sent there; send the text itself, or use a provider that takes token ids (openai, "
        "azure)", "input",
    )  # fmt: skip


def requested_dimensions(body: dict[str, Any]) -> int | None:
    dimensions = body.get("dimensions")
    if isinstance(dimensions, int) and not isinstance(dimensions, bool) and dimensions > 0:
        return dimensions
    return None


def option(
    body: dict[str, Any], name: str, allowed: Sequence[str], provider: str, api: str
) -> str | None:
    """A provider's own field the client sent beside OpenAI's (`extra_body` in the OpenAI
    SDK), one of `allowed`; None when absent, a 400 naming it when it is no such value."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or value not in allowed:
        raise refused(provider, api, f"takes {name} as one of {', '.join(allowed)}", name)
    return value


def estimated_tokens(texts: Sequence[str]) -> int:
    """A token per 4 characters of each text (rounded up): for an API that reports none."""
    return min(sum(math.ceil(len(text) / 4) for text in texts), MAX_TOKENS)


def unit(vector: list[float]) -> list[float]:
    """`vector` rescaled to length 1 (as OpenAI's shortened embeddings are); zero as it is."""
    norm = math.sqrt(sum(value * value for value in vector))
    return [value / norm for value in vector] if norm > 0 else vector


def vectors_of(items: Any, count: int) -> list[list[float]]:
    """`count` vectors of numbers, or the bad-body failure of an answer that is not that."""
    if not isinstance(items, list) or len(items) != count:
        raise bad_body(f"expected {count} embeddings")
    for vector in items:
        if not isinstance(vector, list) or not all(
            isinstance(value, int | float) and not isinstance(value, bool) for value in vector
        ):
            raise bad_body("an embedding is not a list of numbers")
    return items


def answer(vectors: list[list[float]], model: str, tokens: int) -> Completion:
    """The OpenAI embeddings answer of `vectors` (in input order), `tokens` its input tokens."""
    tokens = max(0, min(tokens, MAX_TOKENS))
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": vector}
            for index, vector in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return Completion(body, Usage(tokens, 0))


def token_count(value: Any) -> int | None:
    """A count a provider reported (a JSON number, `3.0` too, or a header's text), None if
    not sane."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def batches(body: dict[str, Any], limit: BatchLimit) -> list[dict[str, Any]]:
    """The request as bodies within `limit`, in order (one body when it fits, or when its
    input is token ids, which the adapter refuses)."""
    texts = body.get("input")
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        return [body]
    size, chars = max(1, limit.inputs), limit.chars
    if len(texts) <= size and (chars is None or sum(map(len, texts)) <= chars):
        return [body]
    groups: list[list[str]] = [[]]
    held = 0
    for text in texts:
        group = groups[-1]
        if group and (len(group) >= size or (chars is not None and held + len(text) > chars)):
            groups.append([])
            group, held = groups[-1], 0
        group.append(text)
        held += len(text)
    return [{**body, "input": group} for group in groups]


def joined(parts: Sequence[Completion]) -> Completion:
    """The answers of a request's batches as one answer: the vectors in order, re-indexed;
    the tokens summed (unknown when any part's are)."""
    if len(parts) == 1:
        return parts[0]
    data: list[dict[str, Any]] = []
    for part in parts:
        for item in part.body.get("data") or ():
            data.append({**item, "index": len(data)})
    usages = [part.usage for part in parts]
    usage: Usage | None = None
    if all(usage is not None for usage in usages):
        usage = Usage(min(sum(u.prompt_tokens for u in usages if u is not None), MAX_TOKENS), 0)
    body = {**parts[0].body, "data": data}
    if usage is not None:
        body["usage"] = {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens}
    else:
        body.pop("usage", None)
    return Completion(body, usage)


def answered_usage(answered: Iterable[tuple[dict[str, Any], Completion]]) -> Usage | None:
    """The input tokens of the batches that answered before another failed (the provider bills
    them although the request fails): each as its answer reported, or estimated from its texts
    when it reported none; None when no batch answered."""
    tokens, any_answered = 0, False
    for body, part in answered:
        any_answered = True
        if part.usage is not None:
            tokens += part.usage.prompt_tokens
        else:
            texts = body.get("input")
            tokens += estimated_tokens(texts if isinstance(texts, list) else [str(texts)])
    return Usage(min(tokens, MAX_TOKENS), 0) if any_answered else None
