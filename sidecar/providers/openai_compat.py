"""OpenAI-compatible providers: one adapter, and a typed table with a row per kind.

A row says where the provider lives, how it authenticates and what it does not accept; the
adapter forwards everything else untouched (unknown parameters pass through, SPEC 2).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from types import MappingProxyType
from typing import Any

import orjson

from sidecar.errors import Outcome, UpstreamError, classify_http_failure
from sidecar.providers.base import (
    MAX_TOKENS,
    Completion,
    HttpRequest,
    KindCaps,
    StreamDecoder,
    UpstreamCall,
    Usage,
)
from sidecar.providers.openai_responses import (
    ResponsesStreamDecoder,
    parse_response_object,
    responses_body,
)
from sidecar.settings.model import ProviderSettings
from sidecar.sse import Framed, encode_all


@dataclass(frozen=True, slots=True)
class CompatKind:
    """One OpenAI-compatible kind, from its provider's published API reference: where it lives,
    how it authenticates, what of an OpenAI request it does not take (dropped, never an error:
    SPEC 2) or takes under another name, and what it can do (`caps`)."""

    kind: str
    base_url: str  # what the provider's own SDK / OpenAI-compatibility page calls its base URL
    caps: KindCaps = field(default_factory=KindCaps)
    auth_header: str = "Authorization"
    auth_prefix: str = "Bearer "
    drop_params: frozenset[str] = frozenset()  # "stream_options" here: never sent
    rename_params: Mapping[str, str] = field(default_factory=dict)
    drop_message_fields: frozenset[str] = frozenset()  # fields of a message it rejects
    app_headers: Mapping[str, str] = field(default_factory=dict)  # header → settings field
    usage_extension: str | None = None  # a chunk object whose `usage` a stream reports in
    # `encoding_format: base64` on /embeddings; without it floats are asked for and the sidecar
    # encodes them (api/embeddings.py)
    embeddings_base64: bool = False


def _params(*names: str) -> frozenset[str]:
    return frozenset(names)


# The output cap the cascade adds is OpenAI's `max_completion_tokens`; a kind whose reference
# documents only `max_tokens` gets it renamed, or the cap (and the budget it protects) is lost.
AS_MAX_TOKENS = MappingProxyType({"max_completion_tokens": "max_tokens"})
# OpenAI request fields that providers without them most often reject (a 400 / 422 for an
# unknown field) rather than ignore
OPENAI_ONLY = _params("store", "metadata", "modalities", "audio")
EMBEDS = KindCaps(embeddings=True)  # OpenAI's /embeddings, under the same base URL

COMPAT_KINDS: Mapping[str, CompatKind] = {
    row.kind: row
    for row in (
        # platform.openai.com/docs/api-reference/chat: the reference every other row differs from
        # …/responses: the Responses API, sent natively (the other rows get it translated)
        CompatKind(
            "openai",
            "https://api.openai.com/v1",
            KindCaps(embeddings=True, responses=True),
            embeddings_base64=True,
        ),
        # docs.vllm.ai OpenAI-compatible server: json_schema via guided decoding, n, stream usage,
        # max_completion_tokens; a key only when started with --api-key (none sent without one)
        CompatKind("vllm", "http://127.0.0.1:8000/v1", EMBEDS, embeddings_base64=True),
        # mistralai/client-python ChatCompletionRequest: random_seed, max_tokens, n, response
        # format text|json_object|json_schema; no stream_options (its schema forbids unknown
        # fields) yet every stream ends with usage; no user, logit_bias, logprobs
        CompatKind(
            "mistral",
            "https://api.mistral.ai/v1",
            EMBEDS,  # /v1/embeddings (mistral-embed), floats
            drop_params=OPENAI_ONLY
            | _params("stream_options", "user", "logit_bias", "logprobs", "top_logprobs"),
            rename_params={"seed": "random_seed", **AS_MAX_TOKENS},
        ),
        # console.groq.com/docs/openai: logprobs, logit_bias, top_logprobs and messages[].name
        # are a 400; "if N is supplied, it must be equal to 1"; groq-python ResponseFormat is
        # text|json_object (json_schema only on a few models: a provider may set
        # native_json_schema); stream usage comes in `x_groq.usage`
        CompatKind(
            "groq",
            "https://api.groq.com/openai/v1",
            caps=KindCaps(json_schema=False, n=False),
            drop_params=OPENAI_ONLY | _params("logprobs", "logit_bias", "top_logprobs"),
            drop_message_fields=_params("name"),
            usage_extension="x_groq",
        ),
        # docs.together.ai chat completions: max_tokens, n, json_object / json_schema response
        # formats; the last chunk of a stream carries usage (stream_options accepted)
        CompatKind(
            "together",
            "https://api.together.xyz/v1",
            EMBEDS,
            drop_params=OPENAI_ONLY,
            rename_params=AS_MAX_TOKENS,
        ),
        # docs.fireworks.ai OpenAI compatibility: "streaming responses include usage in the
        # final chunk" (no stream_options needed), max_tokens, n, json_object / json_schema
        CompatKind(
            "fireworks",
            "https://api.fireworks.ai/inference/v1",
            EMBEDS,
            drop_params=OPENAI_ONLY | _params("stream_options"),
            rename_params=AS_MAX_TOKENS,
        ),
        # api-docs.deepseek.com: base_url https://api.deepseek.com (the /v1 form is an alias);
        # max_tokens, stream_options.include_usage, response_format json_object only; no n;
        # text-only models
        CompatKind(
            "deepseek",
            "https://api.deepseek.com",
            caps=KindCaps(vision=False, json_schema=False, n=False),
            drop_params=OPENAI_ONLY,
            rename_params=AS_MAX_TOKENS,
        ),
        # docs.x.ai chat completions (OpenAI-compatible): structured outputs (json_schema),
        # max_completion_tokens, n, stream_options, image inputs on vision models
        CompatKind("xai", "https://api.x.ai/v1", drop_params=OPENAI_ONLY),
        # docs.perplexity.ai OpenAI compatibility / ApiChatCompletionsRequest: max_tokens,
        # response_format json_schema (and regex), no json_object, no tools, one choice; usage
        # rides on the stream's chunks
        CompatKind(
            "perplexity",
            "https://api.perplexity.ai",
            caps=KindCaps(tools=False, json_object=False, n=False),
            drop_params=OPENAI_ONLY
            | _params(
                "tools",
                "tool_choice",
                "parallel_tool_calls",
                "stream_options",
                "logit_bias",
                "logprobs",
                "top_logprobs",
                "seed",
                "user",
            ),
            rename_params=AS_MAX_TOKENS,
        ),
        # openrouter.ai/docs/api-reference: max_tokens, json_object / json_schema where the
        # routed model has them, one choice per request; HTTP-Referer and X-Title name the
        # calling app (settings app_url / app_name)
        CompatKind(
            "openrouter",
            "https://openrouter.ai/api/v1",
            caps=KindCaps(n=False),
            rename_params=AS_MAX_TOKENS,
            app_headers={"HTTP-Referer": "app_url", "X-Title": "app_name"},
        ),
        # inference-docs.cerebras.ai/resources/openai: frequency_penalty, presence_penalty,
        # logit_bias, parallel_tool_calls and service_tier are a 400; structured outputs
        # (json_schema, strict) and json_object; max_completion_tokens; text-only models; no n
        CompatKind(
            "cerebras",
            "https://api.cerebras.ai/v1",
            caps=KindCaps(vision=False, n=False),
            drop_params=OPENAI_ONLY
            | _params(
                "frequency_penalty",
                "presence_penalty",
                "logit_bias",
                "parallel_tool_calls",
                "service_tier",
            ),
        ),
        # deepinfra.com/docs/advanced/openai_api: api_base https://api.deepinfra.com/v1/openai;
        # max_tokens, n, JSON mode (json_object); stream_options.include_usage
        CompatKind(
            "deepinfra",
            "https://api.deepinfra.com/v1/openai",
            caps=KindCaps(json_schema=False, embeddings=True),
            drop_params=OPENAI_ONLY,
            rename_params=AS_MAX_TOKENS,
        ),
        # docs.ollama.com/api/openai-compatibility: local, no key ("required but ignored": none
        # is sent without one); supported fields include max_tokens (not
        # max_completion_tokens), stream_options.include_usage, response_format; not n,
        # logit_bias or user
        CompatKind(
            "ollama",
            "http://127.0.0.1:11434/v1",
            caps=KindCaps(n=False, embeddings=True),  # /v1/embeddings, floats
            drop_params=OPENAI_ONLY | _params("logit_bias", "user"),
            rename_params=AS_MAX_TOKENS,
        ),
    )
}


def parse_error_envelope(body: bytes) -> tuple[str, str | None, str | None, str | None]:
    """(message, code, type, param) from an OpenAI-style error body, tolerating anything."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body[:300].decode("utf-8", "replace").strip()
        return text or "no error body", None, None, None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        return (
            str(error.get("message") or "upstream error"),
            str(code) if code is not None else None,
            error.get("type") if isinstance(error.get("type"), str) else None,
            error.get("param") if isinstance(error.get("param"), str) else None,
        )
    if isinstance(error, str):
        return error, None, None, None
    return body[:300].decode("utf-8", "replace"), None, None, None


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After") or headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def bad_body(what: str) -> UpstreamError:
    return UpstreamError(
        Outcome.UNAVAILABLE, f"upstream answered an unparseable body: {what}", reason="bad_body"
    )


class OpenAICompatAdapter:
    """Adapter for every row of COMPAT_KINDS; built once per configured provider."""

    def __init__(self, settings: ProviderSettings, row: CompatKind) -> None:
        self.row = row
        self.caps = row.caps
        self.native_json_schema = (
            row.caps.json_schema
            if settings.native_json_schema is None
            else settings.native_json_schema
        )
        self.json_mode = row.caps.json_object
        base = (settings.base_url or row.base_url).rstrip("/")
        self.url = base + "/chat/completions"
        self.embeddings_url = base + "/embeddings"
        self.responses_url = base + "/responses"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if settings.api_key:  # none configured (a local ollama or vllm): no auth header at all
            headers[row.auth_header] = row.auth_prefix + settings.api_key
        for header, setting in row.app_headers.items():
            value = getattr(settings, setting)
            if value:
                headers[header] = value
        headers.update(settings.headers)  # the provider's own `headers:` win
        self.headers = headers
        drop = set(row.drop_params)
        if not row.caps.n:
            drop.add("n")  # n > 1 is refused before the call (cascade); n = 1 is the default
        self.drop = tuple(sorted(drop))
        self.stream_options = row.caps.usage_in_stream and "stream_options" not in drop

    def build_request(self, call: UpstreamCall) -> HttpRequest:
        body: dict[str, Any] = dict(call.body)
        body["model"] = call.model_id
        for name in self.drop:
            body.pop(name, None)
        for old, new in self.row.rename_params.items():
            if old in body:
                value = body.pop(old)
                kept = body.get(new)
                if isinstance(value, int) and isinstance(kept, int):
                    value = min(value, kept)  # both caps were asked for: both hold
                body[new] = value
        if not self.json_mode and _format_type(body) == "json_object":
            del body["response_format"]  # no JSON mode: the schema instruction has to do
        if self.row.drop_message_fields:
            body["messages"] = without_fields(body.get("messages"), self.row.drop_message_fields)
        if call.stream:
            body["stream"] = True
            if self.stream_options:
                options = body.get("stream_options")
                body["stream_options"] = {
                    **(options if isinstance(options, dict) else {}),
                    "include_usage": True,
                }
        headers = {**self.headers, **call.headers} if call.headers else self.headers
        return HttpRequest(self.url, headers, orjson.dumps(body))

    def parse_response(self, body: bytes, call: UpstreamCall) -> Completion:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise bad_body("not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise bad_body("no choices")
        return Completion(data, Usage.from_openai(data.get("usage")), raw=body)

    def build_responses_request(self, call: UpstreamCall) -> HttpRequest:
        """The client's Responses request, as it is, to `{base_url}/responses` (caps.responses)."""
        headers = {**self.headers, **call.headers} if call.headers else self.headers
        return HttpRequest(self.responses_url, headers, responses_body(call, call.model_id))

    def parse_responses_response(self, body: bytes, call: UpstreamCall) -> Completion:
        return parse_response_object(body)

    def responses_stream_decoder(self, call: UpstreamCall) -> StreamDecoder:
        return ResponsesStreamDecoder()

    def build_embeddings_request(self, call: UpstreamCall) -> HttpRequest:
        body: dict[str, Any] = dict(call.body)
        body["model"] = call.model_id
        for name in self.drop:
            body.pop(name, None)
        if not self.row.embeddings_base64:
            body.pop("encoding_format", None)  # floats: the endpoint encodes them if asked
        headers = {**self.headers, **call.headers} if call.headers else self.headers
        return HttpRequest(self.embeddings_url, headers, orjson.dumps(body))

    def parse_embeddings_response(
        self, body: bytes, call: UpstreamCall, headers: Mapping[str, str]
    ) -> Completion:
        return parse_embeddings(body)

    def classify_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
        message, code, error_type, param = parse_error_envelope(body)
        return classify_http_failure(
            status,
            message,
            code=code,
            error_type=error_type,
            param=param,
            retry_after=retry_after_seconds(headers),
        )

    def stream_decoder(self, call: UpstreamCall) -> StreamDecoder:
        options = call.body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        return OpenAIStreamDecoder(wants_usage, call.keep_content, self.row.usage_extension)


def parse_embeddings(body: bytes) -> Completion:
    """An OpenAI embeddings answer; its usage is input tokens only."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_body("not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise bad_body("no data")
    return Completion(data, embeddings_usage(data.get("usage")), raw=body)


def embeddings_usage(data: Any) -> Usage | None:
    """`{"prompt_tokens": N, "total_tokens": N}` → Usage(N, 0); None when absent or not sane."""
    prompt = data.get("prompt_tokens") if isinstance(data, dict) else None
    if not isinstance(prompt, int) or isinstance(prompt, bool) or prompt < 0:
        return None
    return Usage(min(prompt, MAX_TOKENS), 0)


def _format_type(body: dict[str, Any]) -> object:
    response_format = body.get("response_format")
    return response_format.get("type") if isinstance(response_format, dict) else None


def usage_chunk(chunk: dict[str, Any], usage: Usage) -> bytes:
    """The chunk OpenAI ends a stream with when asked to (`stream_options.include_usage`)."""
    head = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
    return orjson.dumps({**head, "choices": [], "usage": usage.as_openai()})


def without_fields(messages: Any, fields: frozenset[str]) -> Any:
    """`messages` with `fields` left out of each message (copied only when one has them)."""
    if not isinstance(messages, list) or not any(
        isinstance(m, dict) and not fields.isdisjoint(m) for m in messages
    ):
        return messages
    return [
        {k: v for k, v in m.items() if k not in fields} if isinstance(m, dict) else m
        for m in messages
    ]


# what may not stand in a JSON string as it is: a quote, a backslash, a control character
_NOT_PLAIN = re.compile(rb'["\\\x00-\x1f]')
_CONTENT_KEY = b'"content":"'
_PADDING_KEY = b'"obfuscation":"'
_ROLE_OPEN = b'"delta":{"role":"assistant","content":""'  # a role chunk's delta, up to its end
_CONTENT_OPEN = b'"delta":{"content":"'  # a content chunk's, up to its content


@dataclass(slots=True)
class ChunkShape:
    """The bytes of a chunk around its content string, learnt from one the decoder parsed:
    a chunk with the same bytes around a plain string (no quote, escape or control
    character) is the same JSON but for that content, so it is read without parsing. OpenAI
    ends each chunk with a random `obfuscation` string (padding against length side
    channels); then `tail` stops before that string's value, which may differ too."""

    head: bytes  # up to the content string's first byte
    tail: bytes  # from its closing quote to the end, or to the padding's value
    padded: bool  # the chunk ends with `"obfuscation":"<padding>"}`
    out_head: bytes | None  # the chunk re-encoded for the client (None: sent as it came)
    out_tail: bytes
    start: int = 0  # len(head)
    tail_bytes: int = 0  # len(tail)
    run: bool = False  # runs of such chunks are read at once (they go out as they came)
    joint: bytes = b""  # the tail, a line break and the head: between two contents
    event_bytes: int = 0  # the bytes of such a chunk's SSE event but its content
    content_of: Callable[[bytes], bytes] = bytes  # such a chunk's content bytes

    def __post_init__(self) -> None:
        self.start, self.tail_bytes = len(self.head), len(self.tail)
        self.run = self.out_head is None and not self.padded and self.tail_bytes > 0
        self.joint = self.tail + b"\n" + self.head
        self.event_bytes = len(b"data: \n\n") + self.start + self.tail_bytes
        self.content_of = itemgetter(slice(self.start, -self.tail_bytes or None))


def _after_role(
    chunk: dict[str, Any], delta: dict[str, Any], data: bytes, out: bytes
) -> ChunkShape | None:
    """The shape of the content chunks that follow the role chunk `data` (parsed: `chunk`,
    its delta `{"role": "assistant", "content": ""}`) when they are written as it is but
    for the role (vLLM's, llama.cpp's, the bench upstream's): a guess, which the first
    content chunk meets byte for byte or is parsed; None for any other chunk."""
    if (
        out is not data
        or list(delta) != ["role", "content"]
        or delta["role"] != "assistant"
        or "obfuscation" in chunk
        or data.count(b'"content"') != 1
    ):
        return None
    at = data.find(_ROLE_OPEN)
    if at < 0:
        return None
    tail = data[at + len(_ROLE_OPEN) - 1 :]  # from the empty content's closing quote
    return ChunkShape(data[:at] + _CONTENT_OPEN, tail, False, None, b"")


def _around(data: bytes, text: bytes, padding: bytes | None) -> tuple[bytes, bytes, bool] | None:
    """(head, tail, padded) of `data` around its one content string `text`; None unless
    `"content"` stands once in it (then it is the key whose value the parse read as `text`)."""
    if data.count(b'"content"') != 1:
        return None
    at = data.find(_CONTENT_KEY + text + b'"')
    if at < 0:
        return None
    start = at + len(_CONTENT_KEY)
    tail = data[start + len(text) :]
    if padding is not None and tail.endswith(b"," + _PADDING_KEY + padding + b'"}'):
        return data[:start], tail[: len(tail) - len(padding) - 2], True
    return data[:start], tail, False


def chunk_shape(chunk: dict[str, Any], data: bytes, out: bytes) -> ChunkShape | None:
    """The shape of `data` (parsed: `chunk`; sent to the client as `out`) when its
    `choices[0].delta.content` is a plain string that can be found in it, else None."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    delta = choices[0].get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    if not isinstance(content, str):
        return None
    if not content:
        return _after_role(chunk, delta, data, out) if isinstance(delta, dict) else None
    text = content.encode()
    if _NOT_PLAIN.search(text):
        return None
    value = chunk.get("obfuscation")
    padding = value.encode() if isinstance(value, str) else None
    if padding is not None and _NOT_PLAIN.search(padding):
        padding = None  # learnt as a fixed part: a chunk with other padding is parsed
    found = _around(data, text, padding)
    if found is None:
        return None
    head, tail, padded = found
    if out is data:
        return ChunkShape(head, tail, padded, None, b"")
    found = _around(out, text, padding if padded else None)
    if found is None or found[2] != padded:
        return None
    return ChunkShape(head, tail, padded, found[0], found[1])


class OpenAIStreamDecoder:
    """Passes OpenAI chunks through byte for byte; reads usage and content on the way.

    A stream's content chunks differ mostly in their content: a chunk that has the shape of
    the last one parsed (`ChunkShape`) is read without parsing it, the same JSON but for
    its content; any other is parsed whole (the first, a role or finish chunk, usage,
    errors, tool calls, several choices, content with escapes)."""

    __slots__ = (
        "_content", "_shape", "finished", "keep_content", "produced", "usage",
        "usage_extension", "wants_usage",
    )  # fmt: skip

    def __init__(
        self, wants_usage: bool, keep_content: bool = False, usage_extension: str | None = None
    ) -> None:
        self.wants_usage = wants_usage
        self.keep_content = keep_content
        self.usage_extension = usage_extension
        self.usage: Usage | None = None
        self._content: list[str] = []
        self.produced = 0
        self.finished = False
        self._shape: ChunkShape | None = None

    @property
    def content(self) -> str:
        return "".join(self._content)

    def feed(self, event: str | None, data: bytes) -> list[bytes]:
        shape = self._shape
        if shape is not None and data.startswith(shape.head):
            # the common case inline: a method call costs as much as the rest of it
            start = shape.start
            end = data.find(b'"', start)
            if shape.padded:
                out = self._padded(shape, data, end)
                if out is not None:
                    return out
            elif end >= 0 and len(data) - end == shape.tail_bytes and data.endswith(shape.tail):
                text = data[start:end]
                try:
                    content = text.decode()
                except UnicodeDecodeError:
                    content = "\\"  # not valid UTF-8: parsed, to fail as parsing fails
                if content.isprintable() and "\\" not in content:  # and no quote: plain
                    self.produced += len(content)
                    if self.keep_content:
                        self._content.append(content)
                    if shape.out_head is None:
                        return [data]
                    return [shape.out_head + text + shape.out_tail]
        if data == b"[DONE]":
            self.finished = True
            return []
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise bad_body("a stream event is not JSON") from None
        if not isinstance(chunk, dict):
            raise bad_body("a stream event is not an object")
        if "error" in chunk:
            message = parse_error_envelope(data)[0]
            raise UpstreamError(
                Outcome.UNAVAILABLE, f"upstream failed mid-stream: {message}", reason="stream_error"
            )
        out = self._read(chunk, data)
        if (
            len(out) == 1
            and _CONTENT_KEY in data  # (a finish or tool-call chunk has no shape to learn)
            and chunk.get("usage") is None
            and (self.usage_extension is None or self.usage_extension not in chunk)
        ):
            self._shape = chunk_shape(chunk, data, out[0]) or self._shape
        return out

    def take_run(self, events: deque[tuple[str | None, bytes]]) -> list[bytes] | None:
        """The chunks of the leading `events` that have the learnt shape, read at once (a
        burst of a stream's content costs a few calls, not a few per chunk) and taken from
        `events`: they go to the client as they came. [] when the first has not that shape;
        None when the burst cannot be read this way (a padded or re-encoded shape, content
        kept, content not ASCII or not plain): `feed` reads them one at a time."""
        shape = self._shape
        if shape is None or not events[0][1].startswith(shape.head):
            return []
        if shape.padded or shape.out_head is not None or self.keep_content:
            return None
        head, tail, start, tail_bytes = shape.head, shape.tail, shape.start, shape.tail_bytes
        datas = [data for _event, data in events]
        starts = [data.startswith(head) for data in datas]
        count = starts.index(False) if False in starts else len(starts)
        run = datas[:count]
        contents = [data[start : len(data) - tail_bytes] for data in run]
        # one comparison for them all: each is the head, its content and the tail (one
        # shorter than head and tail together makes the right side longer)
        if b"\n".join(run) != head + (tail + b"\n" + head).join(contents) + tail:
            return None
        text = b"".join(contents)
        if not text.isascii() or b'"' in text or b"\\" in text:
            return None
        if not text.decode("ascii").isprintable():  # a control character
            return None
        self.produced += len(text)
        for _ in range(count):
            events.popleft()
        return run

    def frame(self, piece: bytes, pos: int, end: int, out: list[bytes]) -> int:
        """Read the events `piece[pos:end]` (whole, each `data: <data>\n\n`), appending what
        the client gets to `out` as Framed events: the bytes of every event `feed` passes on
        as it came stay as they are in the piece (a run of content chunks of the learnt
        shape is read at once: `_run`), any other event's chunks are encoded. Returns where
        it stopped: `end`, after `[DONE]`, or at an event not of that form (multi-line data,
        a comment, a named event), which is the SSE parser's. An error event raises, `out`
        holding the events before it."""
        datas = piece[pos + 6 : end - 2].split(b"\n\ndata: ")
        start = at = pos  # the bytes passed on as they came, not yet in `out`; the event's
        i, count = 0, len(datas)
        runs = True
        try:
            while i < count:
                shape = self._shape
                if runs and shape is not None and shape.run and datas[i].startswith(shape.head):
                    ran = self._run(shape, datas, i)
                    if ran:
                        at += ran[1] + ran[0] * shape.event_bytes
                        i += ran[0]
                        continue
                    runs = False  # not again in this piece (each try looks at the rest of it)
                data = datas[i]
                if b"\n" in data:  # a multi-line event, a comment, a named event: the parser's
                    break
                chunks = self.feed(None, data)
                i += 1
                if len(chunks) == 1 and chunks[0] is data:
                    at += len(data) + 8
                    continue
                if start < at:
                    out.append(Framed(piece[start:at]))
                if chunks:
                    out.append(Framed(encode_all(chunks)))
                at += len(data) + 8
                start = at
                if self.finished:
                    break
        finally:  # (an error event raises: the events before it are out)
            if start < at:
                out.append(Framed(piece[start:at]))
        return at

    def _run(self, shape: ChunkShape, datas: list[bytes], i: int) -> tuple[int, int] | None:
        """(events, content bytes) of the run of chunks of `shape` from `datas[i]` up to the
        last that starts like it, read at once (a few calls, not a few per chunk); None
        when one of them has not that shape around a plain content string (see ChunkShape)
        or is not valid UTF-8."""
        head = shape.head
        end = len(datas)  # after the last event with the head: the run's end, if it is one
        while not datas[end - 1].startswith(head):
            end -= 1
        run = datas[i:end]
        contents = list(map(shape.content_of, run))
        # one comparison for them all: each is the head, its content and the tail (one
        # shorter than head and tail together makes the right side longer)
        if b"\n".join(run) != head + shape.joint.join(contents) + shape.tail:
            return None
        text = b"".join(contents)
        if text.isascii():
            content = text.decode("ascii")
        else:
            try:
                content = "".join(map(bytes.decode, contents))
            except UnicodeDecodeError:
                return None
        if '"' in content or "\\" in content or not content.isprintable():
            return None
        self.produced += len(content)
        if self.keep_content:
            self._content.append(content)
        return len(run), len(text)

    def _padded(self, shape: ChunkShape, data: bytes, end: int) -> list[bytes] | None:
        """`feed` of a chunk that starts like `shape`, one ending in its padding: None unless
        it has that shape around a plain content string and a plain padding."""
        at = end + shape.tail_bytes
        if end < 0 or at > len(data) - 2 or not data.startswith(shape.tail, end):
            return None
        text, padding = data[shape.start : end], data[at:-2]
        try:
            content, pad = text.decode(), padding.decode()
        except UnicodeDecodeError:
            return None
        plain = content.isprintable() and pad.isprintable() and '"' not in pad
        if not plain or "\\" in content or "\\" in pad or not data.endswith(b'"}'):
            return None
        self.produced += len(content)
        if self.keep_content:
            self._content.append(content)
        if shape.out_head is None:
            return [data]
        return [shape.out_head + text + shape.out_tail + padding + b'"}']

    def _read(self, chunk: dict[str, Any], data: bytes) -> list[bytes]:
        """What a parsed chunk gives the client; its content and usage read on the way."""
        choices = chunk.get("choices")
        if choices:
            delta = choices[0].get("delta") if isinstance(choices[0], dict) else None
            if isinstance(delta, dict):
                piece = delta.get("content")
                if isinstance(piece, str):
                    self.produced += len(piece)
                    if self.keep_content:
                        self._content.append(piece)
        usage = chunk.get("usage")
        if self.usage_extension is not None and not usage:
            extension = chunk.get(self.usage_extension)
            found = (
                Usage.from_openai(extension.get("usage")) if isinstance(extension, dict) else None
            )
            if found is not None:
                self.usage = found
                if self.wants_usage:  # the client asked: OpenAI's own usage chunk follows
                    return [data, usage_chunk(chunk, found)]
        if usage:
            self.usage = Usage.from_openai(usage)
            if not self.wants_usage:
                if not choices:
                    return []  # the usage chunk we asked for on our own
                # a kind that reports usage on its content chunks whether asked or not
                del chunk["usage"]
                return [orjson.dumps(chunk)]
        elif "usage" in chunk and not self.wants_usage:
            # `"usage": null` is there only because we asked for usage: OpenAI omits it otherwise
            del chunk["usage"]
            return [orjson.dumps(chunk)]
        return [data]
