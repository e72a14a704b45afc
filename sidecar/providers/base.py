"""The provider boundary: normalized call/result types and the protocols adapters implement.

Adapters are pure translation (OpenAI request → provider request, provider body → OpenAI
shape). The network lives in `sidecar.upstream`; the in-process mock implements
`ProviderClient` directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.settings.model import ProviderSettings

MAX_TOKENS = 10**9  # per call and kind: more is taken as this (keeps money exact in every store)


@dataclass(slots=True)
class Usage:
    """Tokens one call used, as the provider bills them. `prompt_tokens` is every input token
    (cached ones included, as OpenAI counts them); `cache_read_tokens` and `cache_write_tokens`
    are the parts of it read from and written to the provider's prompt cache
    (`cache_write_1h_tokens` the part of the writes to a one-hour cache), and
    `reasoning_tokens` the part of `completion_tokens` spent thinking. The details price the
    call (sidecar/pricing.py); what the client is shown is the adapter's own usage object."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_1h_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        if other.cache_read_tokens or other.cache_write_tokens or other.reasoning_tokens:
            self.cache_read_tokens += other.cache_read_tokens
            self.cache_write_tokens += other.cache_write_tokens
            self.reasoning_tokens += other.reasoning_tokens
            self.cache_write_1h_tokens += other.cache_write_1h_tokens

    def as_openai(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }

    @classmethod
    def from_openai(cls, data: Any) -> Usage | None:
        """An OpenAI usage object (chat or embeddings), with its `prompt_tokens_details.
        cached_tokens` and `completion_tokens_details.reasoning_tokens` (or the
        `prompt_cache_hit_tokens` some compatible APIs report instead); None when not sane."""
        if not isinstance(data, dict):
            return None
        prompt, completion = data.get("prompt_tokens"), data.get("completion_tokens")
        if not isinstance(prompt, int) or not isinstance(completion, int):
            return None
        if prompt < 0 or completion < 0:  # would refund the customer: not a usage
            return None
        usage = cls(min(prompt, MAX_TOKENS), min(completion, MAX_TOKENS))
        # on the path of every answer: a zero or absent detail costs a lookup and a test
        if "prompt_tokens_details" in data:
            details = data["prompt_tokens_details"]
            cached = details.get("cached_tokens") if details.__class__ is dict else None
            if cached and cached.__class__ is int and cached > 0:
                usage.cache_read_tokens = min(cached, usage.prompt_tokens)
        elif "prompt_cache_hit_tokens" in data:
            cached = data["prompt_cache_hit_tokens"]
            if cached.__class__ is int and cached > 0:
                usage.cache_read_tokens = min(cached, usage.prompt_tokens)
        if "completion_tokens_details" in data:
            details = data["completion_tokens_details"]
            reasoning = details.get("reasoning_tokens") if details.__class__ is dict else None
            if reasoning and reasoning.__class__ is int and reasoning > 0:
                usage.reasoning_tokens = min(reasoning, usage.completion_tokens)
        return usage


@dataclass(frozen=True, slots=True)
class KindCaps:
    """What one provider kind's API accepts, from its published reference. Feeds `match:`
    (`caps=`), schema enforcement (native json_schema, json_object or the instruction path of
    SPEC 2.3) and `GET /v1/models`."""

    tools: bool = True
    vision: bool = True
    json_schema: bool = True  # response_format json_schema, natively
    json_object: bool = True  # response_format json_object
    usage_in_stream: bool = True  # usage at the end of a stream (stream_options.include_usage)
    n: bool = True  # several choices in one call
    embeddings: bool = False  # POST /v1/embeddings (the adapter is an EmbeddingsAdapter too)
    # POST /v1/responses natively (the adapter is a ResponsesAdapter too); the other kinds are
    # sent a Responses request translated onto chat
    responses: bool = False

    def names(self) -> frozenset[str]:
        """The `caps` names a catalog entry would list for this kind."""
        return frozenset(
            name
            for name, held in (
                ("tools", self.tools),
                ("vision", self.vision),
                ("json_schema", self.json_schema),
                ("json_object", self.json_object),
                ("usage_in_stream", self.usage_in_stream),
                ("n", self.n),
                ("embeddings", self.embeddings),
            )
            if held
        )


@dataclass(slots=True)
class UpstreamCall:
    """One call to one provider model: the OpenAI-shaped body after rewrites and schema prep."""

    provider: ProviderSettings
    model_id: str
    body: dict[str, Any]  # OpenAI chat request, `model` still the client's value
    stream: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)  # added by rewrite rules
    request_id: str = ""
    keep_content: bool = False  # a stream keeps its content only for validation at its end
    max_output: int | None = None  # the catalog's output cap (for kinds that must send one)


@dataclass(slots=True)
class Completion:
    """A non-streamed answer in OpenAI `chat.completion` shape."""

    body: dict[str, Any]
    usage: Usage | None
    raw: bytes | None = None  # the upstream bytes, forwardable as-is while `body` is untouched

    @property
    def message(self) -> dict[str, Any]:
        choices = self.body.get("choices") or [{}]
        message = choices[0].get("message") or {}
        return message if isinstance(message, dict) else {}

    @property
    def content(self) -> str | None:
        content = self.message.get("content")
        return content if isinstance(content, str) else None

    @property
    def finish_reason(self) -> str | None:
        choices = self.body.get("choices") or [{}]
        reason = choices[0].get("finish_reason")
        return reason if isinstance(reason, str) else None


@dataclass(slots=True)  # made per request: a frozen init costs a call per field
class HttpRequest:
    url: str
    headers: Mapping[str, str]
    body: bytes
    method: str = "POST"


class ChunkStream(Protocol):
    """An open streamed answer: yields lists of OpenAI `chat.completion.chunk` JSON bytes."""

    @property
    def usage(self) -> Usage | None: ...

    @property
    def content(self) -> str:
        """Concatenated content of choice 0 so far, when the call asked to keep it (else "":
        a long stream must not cost its whole length in memory)."""
        ...

    @property
    def produced(self) -> int:
        """Characters of content produced so far, kept or not (to estimate missing usage)."""
        ...

    @property
    def ended(self) -> bool:
        """True once every chunk has been handed out (the next step ends the iteration);
        False while that is not known."""
        ...

    def __aiter__(self) -> ChunkStream: ...

    async def __anext__(self) -> list[bytes]: ...

    async def aclose(self) -> None: ...


class ProviderClient(Protocol):
    """What the cascade calls. One per configured provider, rebuilt on config reload."""

    settings: ProviderSettings
    caps: KindCaps
    native_json_schema: bool
    json_mode: bool

    async def complete(self, call: UpstreamCall) -> Completion: ...

    async def open_stream(self, call: UpstreamCall) -> ChunkStream: ...

    async def embed(self, call: UpstreamCall) -> Completion:
        """An embeddings answer in OpenAI shape (`body` a `list` of `embedding` objects);
        called only when `caps.embeddings`."""
        ...


class ResponsesClient(Protocol):
    """What a client whose kind has the native Responses API adds (`caps.responses`)."""

    async def respond(self, call: UpstreamCall) -> Completion:
        """The provider's `response` object as it is (`usage` read from its usage)."""
        ...

    async def open_response_stream(self, call: UpstreamCall) -> ChunkStream:
        """The provider's Responses events, each the JSON of one event's data."""
        ...


class ResponsesAdapter(Protocol):
    """What an adapter whose kind has the native Responses API adds (`caps.responses`): the
    client's Responses request (`call.body`, `model` still the client's value) at the
    provider's URL, and its answer and events read for usage."""

    def build_responses_request(self, call: UpstreamCall) -> HttpRequest: ...

    def parse_responses_response(self, body: bytes, call: UpstreamCall) -> Completion: ...

    def responses_stream_decoder(self, call: UpstreamCall) -> StreamDecoder: ...


class EmbeddingsAdapter(Protocol):
    """What an adapter whose kind embeds adds (`caps.embeddings`): pure translation of an
    OpenAI embeddings request and answer. `call.body` is the client's request, `model` still
    the client's value; a float answer is turned to base64 by the endpoint when the client
    asked for base64 and the kind cannot send it. The answer's headers are there for an API
    that reports its usage in them (Bedrock's InvokeModel). An adapter whose API takes fewer
    inputs (or tokens) per call than a request may hold has an `embeddings_batch(model_id) ->
    BatchLimit` method as well: the request is then sent as calls within that limit, their
    answers joined (sidecar/providers/native_embeddings.py)."""

    def build_embeddings_request(self, call: UpstreamCall) -> HttpRequest: ...

    def parse_embeddings_response(
        self, body: bytes, call: UpstreamCall, headers: Mapping[str, str]
    ) -> Completion: ...


class StreamDecoder(Protocol):
    """Turns one provider's stream events (SSE events, or what its StreamParser yields) into
    OpenAI chunk bytes, tracking usage and content."""

    @property
    def usage(self) -> Usage | None: ...

    @property
    def content(self) -> str: ...

    @property
    def produced(self) -> int: ...

    @property
    def finished(self) -> bool: ...

    def feed(self, event: str | None, data: bytes) -> list[bytes]: ...


class StreamParser(Protocol):
    """Splits a streamed body into (event name, data) pieces for a StreamDecoder: SSE
    (`sidecar.sse.EventParser`) unless the adapter names another class as `stream_parser`
    (bedrock's binary event stream)."""

    def feed(self, piece: bytes) -> list[tuple[str | None, bytes]]: ...

    def end(self) -> list[tuple[str | None, bytes]]: ...


class Adapter(Protocol):
    """Pure translation for one provider kind; never does I/O. An adapter whose streams are
    not SSE has a `stream_parser` attribute as well: the StreamParser class that reads them."""

    caps: KindCaps
    native_json_schema: bool  # caps.json_schema, unless the provider's config overrides it
    json_mode: bool

    def build_request(self, call: UpstreamCall) -> HttpRequest: ...

    def parse_response(self, body: bytes, call: UpstreamCall) -> Completion: ...

    def classify_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> Exception: ...

    def stream_decoder(self, call: UpstreamCall) -> StreamDecoder: ...
